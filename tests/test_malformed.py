"""Every file in tests/malformed/ is refused by the real CLI: exit 2, `path:line:col:` on stderr's
first line, a `hint:` line, no traceback, nothing written.

`expected.json` maps each case to where the error must point (the path as given on the command
line, or the data file's path for errors inside a data file) and a piece of its message.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

MALFORMED = Path(__file__).resolve().parent / "malformed"
EXPECTED: dict[str, dict[str, str]] = json.loads((MALFORMED / "expected.json").read_text())


def test_the_corpus_is_complete() -> None:
    on_disk = {p.name for p in MALFORMED.iterdir() if p.is_file() and p.name != "expected.json"}
    assert on_disk == set(EXPECTED), "every malformed file needs an entry in expected.json, and back"
    assert len(EXPECTED) >= 32


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_cli_refuses_with_location_and_hint(name: str, home: Path) -> None:
    expected = EXPECTED[name]
    proc = subprocess.run(
        [sys.executable, "-m", "dlm", "doctor", name],
        cwd=MALFORMED,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert proc.returncode == 2, output
    lines = proc.stderr.splitlines()
    assert lines, output
    assert lines[0].startswith(expected["where"] + ":"), f"{lines[0]!r} does not start with {expected['where']!r}:"
    assert expected["message"] in lines[0], lines[0]
    assert any(line.startswith("hint: ") and len(line) > len("hint: ") for line in lines), output
    assert not any(home.iterdir()), "a refused file must not write anything"
