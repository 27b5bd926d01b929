"""Reading and writing documents: text -> `Doc` -> `Spec`, and back to text.

Owns the `.dlm` grammar (`grammar`, with `text` for positions and `frontmatter` for the YAML),
the `data:` files and `read_doc` (`datafiles`), the Pydantic schema and `load_spec` (`schema`), and
the text edits of `dlm init` / `dlm twin` (`authoring`); `training.sources` folders (`sources`);
DocumentLanguageModel's documents, read (`compat`) and rewritten by `dlm migrate` (`migrate`). It may import `dlm.errors`, `dlm.fsutil`,
yaml and pydantic, and nothing else of dlm: no planner, no store, no torch, transformers, peft, trl
or datasets (the import contracts in `.importlinter` check this in `make test`).
"""
