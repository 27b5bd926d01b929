"""What a trained version is for: loading it and generating (`infer`), writing it out (`export`),
and judging twins (`compare`).

It may import `dlm.train` (row rendering, evaluation, runs), `dlm.store`, `dlm.plan`, `dlm.doc` and
`dlm.errors`; heavy libraries only inside functions. Never `dlm.cli`.
"""
