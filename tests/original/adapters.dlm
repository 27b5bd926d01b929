---
dlm_id: 01JC8Z3T6V7W8X9Y0Z1A2B3C4F
dlm_version: 15
base_model: qwen2.5-1.5b
training:
  adapters:
    knowledge:
      lora_r: 8
    tone:
      lora_r: 4
---
::instruction#knowledge::
### Q
What?
### A
That.
