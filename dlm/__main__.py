"""`python -m dlm` runs the command-line app."""

from dlm.cli import main

main()
