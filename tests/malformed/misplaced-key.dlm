---
dlm_id: 01JC8Z3T6V7W8X9Y0Z1A2B3C4D
dlm_version: 1
base_model: smollm2-135m
learning_rate: 2e-4
training:
  adapter: lora
  lora_r: 8
---
# Title

Some prose about the topic.

