---
dlm_id: 01JC8Z3T6V7W8X9Y0Z1A2B3C4D
dlm_version: 9
base_model: qwen2.5-0.5b
training:
  lora_r: 8
  cpt:
    schedule: auto
---
Prose.
