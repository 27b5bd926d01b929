---
dlm_id: 01JC8Z3T6V7W8X9Y0Z1A2B3C4D
dlm_version: 12
base_model: qwen2.5-0.5b
---
A diagram follows.

::image path="figures/flow.png" alt="the flow"::
