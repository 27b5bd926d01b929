---
dlm_id: 01JC8Z3T6V7W8X9Y0Z1A2B3C4D
system_prompt: "You are a tutor.
training:
  lora_r: 8
---
# Title

Some prose about the topic.

