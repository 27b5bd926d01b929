"""dlm: one authored document in, one fine-tuned adapter out."""

__version__ = "0.1.0"
