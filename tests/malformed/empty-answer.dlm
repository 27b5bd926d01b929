---
dlm_id: 01JC8Z3T6V7W8X9Y0Z1A2B3C4D
dlm_version: 1
base_model: smollm2-135m
training:
  adapter: lora
  lora_r: 8
---
::instruction::
### Q
x?
### A

### Q
z?
### A
w.
