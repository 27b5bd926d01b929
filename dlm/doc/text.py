"""Text as every document reader sees it: normalised line ends, 1-based positions, refusals of
empty, binary and unencodable text. Pure; imported by the grammar, the frontmatter reader and the
data-file reader alike.
"""

from __future__ import annotations

from dlm.errors import DlmError

Position = tuple[int, int]
MAX_BYTES = 8 * 2**20  # a document is authored text; anything larger is a mistake or an attack


def normalise(text: str) -> str:
    """BOM stripped, CRLF and lone CR turned into LF: what positions and hashes refer to."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def line_col(text: str, index: int) -> Position:
    """1-based (line, col) of a character index; lines end at LF only."""
    line = text.count("\n", 0, index) + 1
    return line, index - text.rfind("\n", 0, index)


def check_text(text: str, path: str) -> None:
    """Refuse empty, binary and unencodable text before any grammar runs."""
    if not text.strip():
        raise DlmError("the file is empty", "`dlm init FILE` writes a complete scaffold", path, 1, 1)
    nul = text.find("\0")
    if nul >= 0:
        raise DlmError(
            "binary file (it contains a NUL byte)", "dlm reads UTF-8 text files only", path, *line_col(text, nul)
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates can reach parse_doc from Python strings
        raise DlmError(
            "text that cannot be encoded as UTF-8",
            "remove the stray surrogate character",
            path,
            *line_col(text, exc.start),
        ) from None


def join_surrogates(text: str) -> str | None:
    """`text` with surrogate pairs joined into their character; None if a lone surrogate is left."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le")
    except UnicodeDecodeError:
        return None
