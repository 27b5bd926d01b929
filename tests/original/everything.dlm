---
dlm_id: 01JC8Z3T6V7W8X9Y0Z1A2B3C4G
dlm_version: 15
base_model: qwen2.5-3b
training:
  lora_rank: 8
  gate:
    enabled: true
  cpt:
    schedule: dapt
  audio:
    auto_resample: true
  cache:
    enabled: true
  dpo:
    enabled: false
  preference:
    method: orpo
export:
  default_quant: Q3_K
---
Prose.

::image path="figures/arch.png" alt="architecture"::

::audio path="clips/a.wav" transcript="hello"::

::instruction::
### Q what?
### A
x
