"""The one error family of dlm: a message, a hint and where in which file it happened.

`cli.py` catches `DlmError` once and prints `path:line:col: message` plus a `hint:` line. Bad input
exits 2; a run that failed or was blocked exits 1. Bugs are not DlmErrors and keep their traceback.
"""

from __future__ import annotations


class DlmError(Exception):
    """Bad input: one message with its location and a hint. Exit code 2."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        path: str | None = None,
        line: int | None = None,
        col: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.path = path
        self.line = line
        self.col = col

    @property
    def where(self) -> str:
        """`path:line:col` (as much of it as is known), or '' when nothing is."""
        parts = [self.path] if self.path else []
        if self.path and self.line is not None:
            parts.append(str(self.line))
            if self.col is not None:
                parts.append(str(self.col))
        return ":".join(parts)

    def render(self) -> str:
        head = f"{self.where}: {self.message}" if self.where else self.message
        return head + (f"\nhint: {self.hint}" if self.hint else "")

    def __str__(self) -> str:
        return self.render()


class DlmErrors(DlmError):
    """Several errors of one file, reported together (schema validation collects them all)."""

    def __init__(self, errors: list[DlmError]) -> None:
        first = errors[0]
        super().__init__(first.message, first.hint, first.path, first.line, first.col)
        self.errors = list(errors)

    def render(self) -> str:
        return "\n".join(e.render() for e in self.errors)


class RunError(DlmError):
    """A run that could not go on (blocked plan, lock held, NaN loss, store corrupt). Exit code 1."""

    exit_code = 1
