---
dlm_id: 01JC8Z3T6V7W8X9Y0Z1A2B3C4D
dlm_version: 16
---
# Title

Some prose about the topic.

