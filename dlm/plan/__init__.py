"""Facts and judgement: hardware and base facts as values, the corpus split, the planner and its
findings and estimates, and `prepare` (path -> doc, spec, base, split, plan) that every command shares.

`planner.make_plan` is a pure function of values; the only I/O here is reading what it is fed
(`/proc` and `nvidia-smi` in `hardware.probe_light`, configs and file headers in `bases.resolve`,
the document in `prepare`). It may import `dlm.doc`, `dlm.errors` and the standard library; never
torch, transformers, peft, trl or datasets, not even inside a function (checked by `.importlinter`),
so `dlm doctor` answers in a fraction of a second.
"""
