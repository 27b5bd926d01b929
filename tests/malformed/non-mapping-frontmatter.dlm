---
- dlm_id
- base_model
---
# Title

Some prose about the topic.

