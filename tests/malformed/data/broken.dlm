---
ignored: frontmatter
---
::instruction::
### Q
No answer follows.
