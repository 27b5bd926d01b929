"""The store on disk: `$DLM_HOME/store/<dlm_id>/` with its manifest, versions, the atomic `adapter`
pointer, the lock, resumable checkpoints, integrity checks (`integrity`), and which version is a
document's current one (`current`).

It may import `dlm.plan` and `dlm.doc` (types, and `prepare` to know a document's hashes),
`dlm.errors`, `dlm.fsutil`, filelock and numpy (inside functions); never `dlm.train`, `dlm.use` or
`dlm.cli`, and nothing that trains.
"""
