---
dlm_id: 01JC8Z3T6V7W8X9Y0Z1A2B3C4D
base_model: !!python/object/apply:os.system ['echo hi']
---
# Title

Some prose about the topic.

