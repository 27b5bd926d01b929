---
dlm_id: my-first-doc
---
# Title

Some prose about the topic.

