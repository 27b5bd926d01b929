"""The TRL/PEFT edge: rows and chat rendering (`rows`), the training run (`run`) and its loop
plumbing (`loop`: progress, signals), held-out loss (`evaluate`), DoRA's faster forward
(`dora_fast`), the CPU runtime settings (`cpu_runtime`), the steady-state ETA (`progress`), the
base as a loadable folder (`basefolder`), torch's view of the machine (`device`), `doctor --probe`
(`probe`) and a document's runs end to end: plan, lock, train, commit a version (`runs`).

It may import `dlm.store`, `dlm.plan`, `dlm.doc` and `dlm.errors`; torch, transformers, peft, trl
and datasets only inside functions, so importing any module here stays instant. Never `dlm.use` or
`dlm.cli`.
"""
