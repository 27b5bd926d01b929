"""`python -m dlm` runs the command-line app."""

from dlm.cli.app import main

main()
