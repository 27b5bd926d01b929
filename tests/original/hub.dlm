---
dlm_id: 01JC8Z3T6V7W8X9Y0Z1A2B3C4E
dlm_version: 7
base_model: hf:Qwen/Qwen2.5-0.5B-Instruct
---
Some prose.

::instruction::
### Q !probe
A probe first?
### A
Yes.
### Q
And a trained pair?
### A
Also.
