"""The command line: the Typer app (`app`), every rich table and panel (`render`) and the compare
chart (`plot`). Decides nothing: each command parses its options, calls one function below it and
renders the result. It may import every other package (lazily, inside commands, so `dlm --help` and
`dlm doctor` never import torch); nothing imports it.
"""
