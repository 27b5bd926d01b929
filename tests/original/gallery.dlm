---
# A gallery template as DocumentLanguageModel writes it
dlm_id: 01JC8Z3T6V7W8X9Y0Z1A2B3C4D
dlm_version: 15
base_model: qwen2.5-coder-1.5b   # its most common base
system_prompt: You answer questions about the build system.
training:
  adapter: lora
  lora_r: 8
  lora_alpha: 16
  lora_dropout: 0.05
  target_modules: auto
  sequence_len: 2048
  micro_batch_size: auto
  grad_accum: auto
  learning_rate: 0.0002
  num_epochs: 3
  optimizer: adamw_bnb_8bit
  lr_scheduler: cosine
  warmup_ratio: 0.1
  precision: null
  seed: 42
export:
  default_quant: Q4_K_M   # what `ollama create` gets
  default_temperature: 0.7
  default_top_p: 0.9
---
# The build system

The build runs in three stages: fetch, compile, link.

<!-- dlm-auto-harvest: source="notes/build.md" -->
More prose about the build, harvested from notes.

::instruction::
<!-- dlm-auto-synth: synth_teacher="self" synth_strategy="extraction" synth_at="2025-01-01T00:00:00Z" source_section_id="0123456789abcdef" -->
### Q
How many stages does the build have?
### A
Three: fetch, compile and link.

### Q !probe
Which stage comes last?
### A
Link.

### Q
What comes first?
### A
Fetch.

::preference::
### Prompt
Describe the build in one word.
### Chosen
Staged.
### Rejected
Magic.

::prose::
Back to prose: the cache lives under `.cache/`.
