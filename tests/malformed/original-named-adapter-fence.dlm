---
dlm_id: 01JC8Z3T6V7W8X9Y0Z1A2B3C4D
dlm_version: 15
base_model: qwen2.5-1.5b
---
Prose first.

::instruction#tone::
### Q
Hello?
### A
Hi.
