---
base_model: smollm2-135m
---
# Title

Some prose about the topic.

