# Title

Some prose about the topic.

