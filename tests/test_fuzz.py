"""Property-based fuzzing of the document parser and the schema: bad input only ever ends as a DlmError.

The property, for every generated text: `parse_doc` then `parse_spec` either succeed, or raise a
`DlmError` (a `DlmErrors` for the schema) whose every error has the path, a line inside the text, a
column inside that line (or just past its end), a non-empty hint, and a message that can be printed
as UTF-8. Any other exception is a bug. A document that passes also goes through
`corpus.examples` / `corpus.split`, which must not raise and must partition the examples.

The strategies stay close to valid input so they reach deep code paths: mutations of the real
configs/ files, frontmatter mappings built from the schema's own keys with values of random types,
bodies from a grammar of fences, headers, code blocks and text, and well-formed documents whose
parse is checked against a model. A smaller property writes `.jsonl` data files and runs `read_doc`.

Bounded and reproducible: each test has a fixed example budget (together >= 10,000, checked by the
last test), `derandomize=True`, no deadline and no example database, so every run tries the same
inputs; about a minute on two cores. `DLM_FUZZ_SCALE=10` multiplies every budget for a longer hunt.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import typing
from collections import Counter
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dlm.doc.datafiles import read_doc  # noqa: E402
from dlm.doc.grammar import parse_doc  # noqa: E402
from dlm.doc.schema import SCHEMA_VERSION, Adapter, Optimizer, Spec, Training, parse_spec  # noqa: E402
from dlm.doc.text import normalise  # noqa: E402
from dlm.errors import DlmError, DlmErrors  # noqa: E402
from dlm.plan import corpus  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCALE = float(os.environ.get("DLM_FUZZ_SCALE", "1"))
ID = "01JC8Z3T6V7W8X9Y0Z1A2B3C4D"

# Example budgets per test; together at least 10,000 (test_the_budget_was_spent checks what ran).
BUDGET = {
    "test_mutated_configs": 4500,
    "test_mutated_configs_as_specs": 900,
    "test_random_frontmatter": 2000,
    "test_random_bodies": 2000,
    "test_valid_bodies_match_their_model": 600,
    "test_valid_training_values_round_trip": 600,
    "test_jsonl_data_files": 400,
}
RAN: Counter[str] = Counter()


def fuzz(name: str) -> settings:
    return settings(
        max_examples=max(1, int(BUDGET[name] * SCALE)),
        deadline=None,
        derandomize=True,  # the same inputs on every run: a failure here is reproducible as is
        database=None,  # write nothing into the working tree
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


# ---------------------------------------------------------------- the property


def assert_located(exc: DlmError, text: str | None, path: str) -> None:
    """Every error of `exc` names `path`, a line of `text` (or the one after it), a column, a hint."""
    errors = exc.errors if isinstance(exc, DlmErrors) else [exc]
    assert errors
    exc.render().encode("utf-8")  # printable: no lone surrogate may reach the terminal
    lines = normalise(text).split("\n") if text is not None else None
    for e in errors:
        assert e.path == path, e.render()
        assert isinstance(e.line, int) and e.line >= 1, e.render()
        assert isinstance(e.col, int) and e.col >= 1, e.render()
        assert isinstance(e.hint, str) and e.hint.strip(), e.render()
        assert isinstance(e.message, str) and e.message.strip(), e.render()
        if lines is not None:
            assert e.line <= len(lines) + 1, (e.render(), len(lines))
            if e.line <= len(lines):
                assert e.col <= len(lines[e.line - 1]) + 1, (e.render(), lines[e.line - 1])


def check_corpus(doc: Any, spec: Spec) -> None:
    """examples/split never raise on a valid document, and split is a partition that honours pins."""
    exs = corpus.examples(doc, spec.system_prompt)
    assert len({e.id for e in exs}) == len(exs)
    train, held = corpus.split(exs, spec.training.seed, spec.training.eval_fraction)
    assert sorted(e.id for e in train + held) == sorted(e.id for e in exs)
    assert not {e.id for e in train} & {e.id for e in held}
    assert all(not e.pinned_heldout for e in train)
    assert (train, held) == corpus.split(exs, spec.training.seed, spec.training.eval_fraction)
    corpus.stats(train, held)


def _event(what: str) -> None:
    """Count an outcome for `--hypothesis-show-statistics` (outside a @given test, do nothing)."""
    try:
        hypothesis.event(what)
    except hypothesis.errors.InvalidArgument:
        pass


def pipeline(text: str, path: str) -> tuple[Any, Spec] | None:
    """parse_doc + parse_spec (+ corpus on success); None when the input was refused properly."""
    try:
        doc = parse_doc(text, path)
    except DlmError as exc:
        assert_located(exc, text, path)
        _event("refused by the parser")
        return None
    try:
        spec = parse_spec(doc.frontmatter, doc.positions, doc.path)
    except DlmError as exc:
        assert_located(exc, text, path)
        _event(f"refused by the schema ({'several errors' if len(getattr(exc, 'errors', [])) > 1 else 'one error'})")
        return None
    _event("accepted")
    for name, value in [*spec.model_dump().items(), *spec.training.model_dump().items()]:
        assert not isinstance(value, float) or math.isfinite(value), (name, value)  # no .inf / .nan knob
    n_lines = normalise(text).count("\n") + 1
    for line, col in doc.positions.values():
        assert 1 <= line <= n_lines and col >= 1
    for s in doc.sections:
        assert 1 <= s.line <= n_lines
    check_corpus(doc, spec)
    return doc, spec


# ---------------------------------------------------------------- seeds: real configs and a few rich documents

RICH_DLM = f"""\
---
# every construct the grammar knows, in one valid document
dlm_id: {ID}
dlm_version: 1
base_model: smollm2-135m
system_prompt: "Answer briefly: one line."
training:
  <<: {{lora_r: 8, lora_alpha: 4}}
  lora_alpha: &sixteen 16
  logging_steps: *sixteen
  adapter: dora
  target_modules: [q_proj, v_proj]
  learning_rate: 2e-4
  micro_batch_size: auto
  grad_accum: 2
  gradient_checkpointing: true
  eval_fraction: 0.25
---
# Title

Lead prose with `inline code` and a list:

- item one
- item two

```python
::instruction::
### Q
```

::instruction::
### Q
What is two plus two?
### A
Four.

### Q
Show a block.
### A
~~~~
::preference::
~~~~

::instruction heldout::
### Q
Pinned?
### A
Yes.

::preference::
### Prompt
Say hi.
### Chosen
Hi.
### Rejected
Go away.

::prose heldout::
Held-out prose.
"""

RICH_YAML = f"""\
# a standalone spec
dlm_id: {ID}
dlm_version: 1
base_model: org/name
system_prompt: |
  Multi-line
  system prompt.
data:
  - data/a.jsonl
  - notes.md
training:
  adapter: qlora
  lora_r: 16
  lora_dropout: 0.05
  optimizer: galore_adamw
  galore_rank: 4
  max_steps: 30
  precision: bf16
  lr_scheduler: cosine
  warmup_ratio: 0.1
  report_to: tensorboard
  seed: 7
"""


def _seeds(suffixes: tuple[str, ...]) -> list[tuple[str, str]]:
    found = [
        (p.name, p.read_text(encoding="utf-8")) for p in sorted((REPO / "configs").iterdir()) if p.suffix in suffixes
    ]
    found += [(n, t) for n, t in (("rich.dlm", RICH_DLM), ("rich.yaml", RICH_YAML)) if n.endswith(suffixes)]
    return found


DLM_SEEDS = _seeds((".dlm",))
YAML_SEEDS = _seeds((".yaml",))


def test_the_seeds_are_valid() -> None:
    assert len(DLM_SEEDS) >= 4 and len(YAML_SEEDS) >= 2
    for name, text in DLM_SEEDS + YAML_SEEDS:
        assert pipeline(text, name) is not None, name


# ---------------------------------------------------------------- mutations

FENCE_LINES = [
    "::instruction::",
    "::preference::",
    "::prose::",
    "::instruction heldout::",
    "::prose heldout::",
    "::preference heldout::",
    "  ::instruction::  ",
    "\t::prose::",
    "::x::",
    "::::",
    ":::::",
    "::Instruction::",
    ":: instruction ::",
    "::instruction extra::",
    "::instruction held-out::",
    "::instrucion::",
    "::note::",
    "::instruction heldout heldout::",
    "::instruction\theldout::",
    "::préférence::",
    "::🙂::",
]
HEADER_LINES = [
    "### Q",
    "### A",
    "### Prompt",
    "### Chosen",
    "### Rejected",
    "###  Q ",
    "  ### A",
    "### Question",
    "### Answer",
    "## Q",
    "###Q",
    "### q",
    "#### A",
    "### A:",
    "# Prompt",
    "### Q extra",
    "### Chosen!",
]
CODE_LINES = ["```", "````", "~~~", "~~~~", "```python", "  ```", "```x```", "``` `", "~~~ ~~~", "```\t", "`` `"]
YAML_LINES = [
    "---",
    "...",
    "--- x",
    "%YAML 1.1",
    "%TAG ! tag:x,2000:",
    "a: &a [1, 2]",
    "b: *a",
    "<<: *a",
    "<<: [*a, *a]",
    "<<: 5",
    "*a",
    "&a",
    "? complex",
    ": x",
    "- item",
    "-",
    "{",
    "[",
    "}",
    "]",
    "'",
    '"',
    "key: 'unclosed",
    'key: "\\ud800"',
    'key: "\\x00"',
    'system_prompt: "\\ud83d\\ude00 \\ud800"',
    "key: !!python/object:os.system x",
    "key: !!binary aGVsbG8=",
    "key: !!set {a, b}",
    "key: !!omap [a: 1]",
    "key: !custom x",
    "key: !!str 2e-5",
    "lora_r: 1e999",
    "lora_r: 99999999999999999999999999999999",
    "seed: -1",
    "seed: 0x1F",
    "seed: 0o17",
    "seed: 1_000",
    "seed: 1:30",
    "seed: " + "9" * 5000,
    "learning_rate: .nan",
    "learning_rate: .inf",
    "learning_rate: -.inf",
    "num_epochs: 2001-13-45",
    "num_epochs: 2001-12-14t21:59:43.10-05:00",
    "num_epochs: 2001-12-14 99:00:00",
    "on: true",
    "yes: no",
    "1: x",
    "null: x",
    "~: x",
    "[a, b]: c",
    "{a: b}: c",
    "? [a]\n: b",
    "key: |",
    "key: >-",
    "  | bad",
    "key: @x",
    "key: `x",
    "key: %x",
    "key: a: b",
    "dlm_id: 01JC8Z3T6V7W8X9Y0Z1A2B3C4",
    "dlm_version: 99",
    "training: [1, 2]",
    "training: null",
    "training:",
    "data: [../x.jsonl, /etc/hosts]",
    "data: 5",
    "target_modules: []",
    "target_modules: [q_proj, q_proj]",
    "target_modules: [1, {a: b}]",
    "adapter: DoRA",
    "lora_rank: 8",
    "use_dora: true",
    "extra: " + "[" * 25 + "]" * 25,
    "extra: " + "{a: " * 25 + "1" + "}" * 25,
    "x: &x [*x]",
    "y: &y {k: *y}",
    "\u2028key: x",
    "key\x85: x",
    "\x07bell: x",
    "\ufeffdlm_id: x",
]
TEXT_LINES = [
    "",
    " ",
    "\t",
    "plain prose",
    "é ü ß 日本語 🙂 עברית",
    "\u200b\u200d",
    "\u2028",
    "\x85",
    "\ufeff",
    "\x00",
    "\x07",
    "\ud800",
    "a\x0bb\x0cc",
    "#",
    "# heading",
    "- list",
    "> quote",
    "    indented code",
    "|",
    "::",
    ":: ::",
]
SNIPPETS = [
    "\t",
    ": ",
    " #",
    "&x ",
    "*x",
    "!",
    "|",
    ">",
    "%",
    "@",
    "`",
    "'",
    '"',
    "[",
    "{",
    "]",
    "}",
    ",",
    "- ",
    "? ",
    "\\",
    "\ufeff",
    "\u2028",
    "\x85",
    "\r",
    "\r\n",
    "\x00",
    "\ud800",
    "é",
    "🙂",
    "e-5",
    "0x",
    ".",
    "~",
]
INSERT_LINES = FENCE_LINES + HEADER_LINES + CODE_LINES + YAML_LINES + TEXT_LINES


def _index(draw: Any, seq: list, extra: int = 0) -> int:
    return draw(st.integers(0, max(0, len(seq) - 1 + extra)))


def _mutate_lines(draw: Any, lines: list[str]) -> list[str]:
    lines = list(lines)
    op = draw(
        st.sampled_from(
            [
                "delete",
                "duplicate",
                "swap",
                "move",
                "insert",
                "insert",
                "insert",
                "snippet",
                "tab",
                "indent",
                "dedent",
                "value",
            ]
        )
    )
    if not lines:
        return [draw(st.sampled_from(INSERT_LINES))]
    i = _index(draw, lines)
    if op == "delete":
        del lines[i : i + draw(st.integers(1, 3))]
    elif op == "duplicate":
        lines.insert(i, lines[i])
    elif op in ("swap", "move"):
        j = _index(draw, lines)
        if op == "swap":
            lines[i], lines[j] = lines[j], lines[i]
        else:
            lines.insert(j, lines.pop(i))
    elif op == "insert":
        lines.insert(_index(draw, lines, 1), draw(st.sampled_from(INSERT_LINES)))
    elif op == "snippet":
        c = draw(st.integers(0, len(lines[i])))
        lines[i] = lines[i][:c] + draw(st.sampled_from(SNIPPETS)) + lines[i][c:]
    elif op == "tab":
        lines[i] = "\t" + lines[i].lstrip(" ") if draw(st.booleans()) else lines[i].replace(" ", "\t", 1)
    elif op == "indent":
        lines[i] = " " * draw(st.integers(1, 4)) + lines[i]
    elif op == "dedent":
        lines[i] = lines[i].lstrip()
    else:  # replace the value after the first ': ' (a frontmatter key's value, most often)
        head, sep, _ = lines[i].partition(": ")
        if sep:
            lines[i] = head + sep + draw(yaml_value_text)
    return lines


def _mutate_text(draw: Any, text: str) -> str:
    op = draw(st.sampled_from(["flip", "truncate", "crlf", "cr", "bom", "delete-char", "none", "none"]))
    if op == "flip" and text:
        i = draw(st.integers(0, len(text) - 1))
        code = ord(text[i]) ^ (1 << draw(st.integers(0, 20)))
        text = text[:i] + chr(code % 0x110000) + text[i + 1 :]
    elif op == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif op == "crlf":
        text = text.replace("\n", "\r\n")
    elif op == "cr":
        text = text.replace("\n", "\r")
    elif op == "bom":
        text = "\ufeff" + text
    elif op == "delete-char" and text:
        i = draw(st.integers(0, len(text) - 1))
        text = text[:i] + text[i + 1 :]
    return text


yaml_value_text = st.one_of(
    st.sampled_from(
        [
            "",
            "~",
            "null",
            "yes",
            "no",
            "on",
            "Off",
            "true",
            "auto",
            "all-linear",
            "[]",
            "{}",
            "[q_proj]",
            "[q_proj, ]",
            "dora",
            "qlora",
            "lora",
            "galore_adamw_layerwise",
            "bf16",
            "0",
            "-1",
            "1.5",
            "1e-5",
            "1E3",
            "-3.5e+2",
            ".5",
            "1e",
            "0x10",
            "0b101",
            "1_0",
            "12:30",
            ".inf",
            "-.inf",
            ".NaN",
            "2001-12-14",
            "2e400",
            "1" + "0" * 400,
            "'quoted'",
            '"dq"',
            "'unclosed",
            '"\\ud800"',
            '"\\uDFFF"',
            '"\\U0001F600"',
            '"\\0"',
            '"\\x85"',
            "&a 1",
            "*a",
            "*undefined",
            "!!int x",
            "!!float 1",
            "!!bool maybe",
            "!!null x",
            "!!timestamp x",
            "!!str",
            "!!map {a: 1}",
            "|",
            ">",
            "|-\n  text",
            "[1, [2, [3]]]",
            "{a: {b: {c: 1}}}",
            "- a",
            "a: b",
            "#comment",
            "x #comment",
            "01JC8Z3T6V7W8X9Y0Z1A2B3C4D",
            "01jc8z3t6v7w8x9y0z1a2b3c4d",
            "smollm2-135m",
            "org/name",
            "./model.gguf",
        ]
    ),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
)


@st.composite
def mutated(draw: Any, seeds: list[tuple[str, str]]) -> tuple[str, str]:
    name, text = draw(st.sampled_from(seeds))
    lines = text.split("\n")
    for _ in range(draw(st.integers(1, 4))):
        lines = _mutate_lines(draw, lines)
    return name, _mutate_text(draw, "\n".join(lines))


@fuzz("test_mutated_configs")
@given(case=mutated(DLM_SEEDS))
def test_mutated_configs(case: tuple[str, str]) -> None:
    RAN["test_mutated_configs"] += 1
    name, text = case
    pipeline(text, name)


@fuzz("test_mutated_configs_as_specs")
@given(case=mutated(YAML_SEEDS + DLM_SEEDS))
def test_mutated_configs_as_specs(case: tuple[str, str]) -> None:
    """The same mutations read as standalone specs (a .dlm's '---' lines are then YAML documents)."""
    RAN["test_mutated_configs_as_specs"] += 1
    name, text = case
    pipeline(text, name.rsplit(".", 1)[0] + ".yaml")


# ---------------------------------------------------------------- random frontmatter from the schema's keys

TOP_KEYS = list(Spec.model_fields)
TRAINING_KEYS = list(Training.model_fields)
STRANGE_KEYS = [
    "lora_rank",
    "rank",
    "lr",
    "use_dora",
    "load_in_4bit",
    "model",
    "trainig",
    "Training",
    "DATA",
    "",
    "<<",
    "on",
    "yes",
    "1",
    "null",
    "~",
    "a b",
    "#x",
    "-x",
    "ключ",
    "🔑",
    "x" * 300,
]
ENUM_VALUES = [
    "auto",
    "all-linear",
    *get_args(Adapter),
    *get_args(Optimizer),
    "bf16",
    "fp16",
    "fp32",
    "linear",
    "cosine",
    "constant_with_warmup",
    "none",
    "tensorboard",
    ID,
    "smollm2-135m",
    "q_proj",
    "v_proj",
    "2e-5",
    "1E3",
    "yes",
    "no",
    "on",
    "off",
    "0x1F",
    "0o17",
    "1_000",
    "1:30",
    "2001-12-14",
    ".inf",
    ".nan",
    "~",
    "null",
    "true",
    "data/a.jsonl",
    "../x.jsonl",
    "/etc/hosts",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(ENUM_VALUES),
    st.text(max_size=16),
    st.integers(-(2**40), 2**40),
    st.integers(-(2**80), 2**80),
    st.sampled_from([0, 1, 8, 16, 1024, 1025, 2**32, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.05, 0.1, 0.9, 1.0, 2e-4, 1e-300, 1e300]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(TRAINING_KEYS + STRANGE_KEYS), inner, max_size=4)
    ),
    max_leaves=8,
)


def _plain(value: Any, draw: Any) -> str:
    """A scalar written by hand, sometimes unquoted where a YAML dumper would quote it."""
    if isinstance(value, str):
        style = draw(st.sampled_from(["plain", "single", "double", "dump"]))
        if style == "plain":
            return value
        if style == "single":
            return "'" + value.replace("'", "''") + "'"
        if style == "double":
            return json.dumps(value)  # JSON string escapes are YAML double-quoted escapes
    elif isinstance(value, (int, float, bool)) or value is None:
        if draw(st.booleans()):
            return (
                {True: "true", False: "false", None: "null"}.get(value, repr(value))
                if isinstance(value, (bool, type(None)))
                else repr(value)
            )
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _emit(mapping: dict, draw: Any, indent: str = "") -> list[str]:
    """Block-style YAML written line by line: plain keys, hand-picked scalar styles, nested blocks."""
    out = []
    for key, value in mapping.items():
        k = key if draw(st.booleans()) or not key else json.dumps(key)
        if isinstance(value, dict) and value and draw(st.booleans()):
            out.append(f"{indent}{k}:")
            out += _emit(value, draw, indent + draw(st.sampled_from(["  ", "    ", " "])))
        elif isinstance(value, list) and value and draw(st.booleans()):
            out.append(f"{indent}{k}:")
            out += [f"{indent}  - {_plain(v, draw)}" for v in value]
        else:
            out.append(f"{indent}{k}: {_plain(value, draw)}")
    return out


@st.composite
def frontmatters(draw: Any) -> dict:
    fm: dict[str, Any] = {}
    if draw(st.integers(0, 9)):  # usually a valid id, so the schema goes on to the other keys
        fm["dlm_id"] = ID
    for key in draw(
        st.lists(st.sampled_from(TOP_KEYS + STRANGE_KEYS[:8] + TRAINING_KEYS[:6]), max_size=5, unique=True)
    ):
        fm[key] = draw(values)
    if draw(st.booleans()):
        fm["training"] = draw(
            st.dictionaries(st.sampled_from(TRAINING_KEYS + STRANGE_KEYS), st.one_of(scalars, values), max_size=8)
        )
    return fm


@st.composite
def frontmatter_docs(draw: Any) -> tuple[str, str]:
    fm = draw(frontmatters())
    how = draw(st.sampled_from(["lines", "lines", "block", "flow", "unicode"]))
    if how == "lines":
        body_yaml = "\n".join(_emit(fm, draw)) + "\n"
    else:
        body_yaml = yaml.safe_dump(
            fm,
            default_flow_style=(how == "flow"),
            allow_unicode=(how == "unicode"),
            sort_keys=draw(st.booleans()),
            width=draw(st.sampled_from([20, 80, 10_000])),
        )
    if draw(st.integers(0, 4)) == 0:
        return "spec.yaml", body_yaml
    return "doc.dlm", "---\n" + body_yaml + "---\n" + draw(bodies)


# ---------------------------------------------------------------- random bodies from a grammar

body_line = st.one_of(
    st.sampled_from(FENCE_LINES),
    st.sampled_from(FENCE_LINES[:6]),
    st.sampled_from(HEADER_LINES),
    st.sampled_from(HEADER_LINES[:5]),
    st.sampled_from(CODE_LINES),
    st.sampled_from(TEXT_LINES),
    st.text(alphabet=string.ascii_letters + " :#`~-*\t", max_size=20),
    st.text(max_size=12),
)
bodies = st.lists(body_line, max_size=30).map("\n".join)


@fuzz("test_random_frontmatter")
@given(case=frontmatter_docs())
def test_random_frontmatter(case: tuple[str, str]) -> None:
    RAN["test_random_frontmatter"] += 1
    path, text = case
    pipeline(text, path)


FRONT = f"---\ndlm_id: {ID}\ntraining:\n  eval_fraction: 0.5\n---\n"


@fuzz("test_random_bodies")
@given(body=bodies, ending=st.sampled_from(["\n", "\r\n", "\r"]))
def test_random_bodies(body: str, ending: str) -> None:
    """A random body either parses or is refused at a line of the body; CRLF and CR change nothing."""
    RAN["test_random_bodies"] += 1
    text = FRONT + body
    outcome = _outcome(text)
    if "\r" not in body:
        assert _outcome(text.replace("\n", ending)) == outcome
    if outcome[0] == "error":
        assert outcome[2] >= 6, outcome  # the frontmatter is fine: the error is in the body
    pipeline(text, "body.dlm")


def _outcome(text: str) -> tuple:
    try:
        d = parse_doc(text, "body.dlm")
    except DlmError as e:
        return ("error", e.message, e.line, e.col)
    return ("ok", d.sha256, d.sections)


# ---------------------------------------------------------------- valid documents against a model

words = st.text(alphabet=string.ascii_letters + string.digits + " .,;!?'()-", min_size=1, max_size=30).filter(str.strip)
paragraph = st.lists(words, min_size=1, max_size=3).map(lambda ws: "\n".join(w.strip() or "x" for w in ws))
code_block = st.tuples(
    st.sampled_from(["```", "~~~", "````"]), st.lists(st.sampled_from(FENCE_LINES + HEADER_LINES), max_size=3)
).map(lambda t: "\n".join([t[0], *t[1], t[0]]))
answer = st.one_of(paragraph, st.tuples(paragraph, code_block).map("\n".join))


@st.composite
def valid_sections(draw: Any) -> list[tuple[str, bool, list[tuple[str, ...]]]]:
    out = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["prose", "instruction", "preference"]))
        held = draw(st.booleans())
        n = {"prose": 1, "instruction": 2, "preference": 3}[kind]
        items = draw(st.lists(st.tuples(*[answer] * n), min_size=1, max_size=3))
        out.append((kind, held, items))
    return out


def render_sections(sections: list, draw: Any) -> str:
    blank = lambda: "\n" * draw(st.integers(0, 2))  # noqa: E731
    parts = []
    for kind, held, items in sections:
        parts.append(
            draw(st.sampled_from(["", " ", "\t"]))
            + f"::{kind}{' heldout' if held else ''}::"
            + draw(st.sampled_from(["", "  "]))
        )
        headers = {"prose": None, "instruction": ("Q", "A"), "preference": ("Prompt", "Chosen", "Rejected")}[kind]
        for item in items:
            if headers is None:
                parts.append(blank() + item[0])
            else:
                for h, t in zip(headers, item):
                    parts += [f"### {h}", blank() + t + blank()]
    return "\n".join(parts) + "\n"


@fuzz("test_valid_bodies_match_their_model")
@given(data=st.data())
def test_valid_bodies_match_their_model(data: Any) -> None:
    RAN["test_valid_bodies_match_their_model"] += 1
    model = data.draw(valid_sections())
    text = FRONT + render_sections(model, data.draw)
    result = pipeline(text, "valid.dlm")
    assert result is not None, text
    doc, _ = result
    got = list(doc.sections)
    assert [(s.kind, s.heldout) for s in got] == [(k, h) for k, h, _ in model]
    for s, (kind, _, items) in zip(got, model):
        if kind == "prose":
            assert s.text == items[0][0].strip() if len(items) == 1 else all(i[0].strip() in s.text for i in items)
        elif kind == "instruction":
            assert [(p.question, p.answer) for p in s.pairs] == [(q.strip(), a.strip()) for q, a in items]
        else:
            assert [(t.prompt, t.chosen, t.rejected) for t in s.triples] == [tuple(x.strip() for x in i) for i in items]


# ---------------------------------------------------------------- valid training values round-trip


class _Dumper(yaml.SafeDumper):
    """Quotes what dlm's loader would read as a float (`2e-5`), like dlm's own resolver."""


_Dumper.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)

module_names = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_.]{0,12}\Z")
auto_or_int = st.one_of(st.just("auto"), st.integers(1, 4096))
finite = {"allow_nan": False, "allow_infinity": False}
valid_training = st.fixed_dictionaries(
    {},
    optional={
        "adapter": st.sampled_from(["lora", "qlora", "dora"]),
        "lora_r": st.integers(1, 1024),
        "lora_alpha": st.integers(1, 2**31),
        "lora_dropout": st.floats(0, 1, exclude_max=True, **finite),
        "target_modules": st.one_of(
            st.sampled_from(["auto", "all-linear"]), st.lists(module_names, min_size=1, max_size=4, unique=True)
        ),
        "use_rslora": st.booleans(),
        "optimizer": st.sampled_from(typing.get_args(Training.model_fields["optimizer"].annotation)),
        "galore_rank": st.one_of(st.just("auto"), st.integers(1, 10**6)),
        "galore_scale": st.floats(1e-9, 1e6, **finite),
        "learning_rate": st.floats(1e-12, 1, **finite),
        "num_epochs": st.one_of(st.integers(1, 10_000), st.floats(1e-6, 10_000, **finite)),
        "max_steps": st.one_of(st.none(), st.integers(1, 10**9)),
        "micro_batch_size": auto_or_int,
        "grad_accum": auto_or_int,
        "sequence_len": st.integers(16, 1_048_576),
        "precision": st.sampled_from(["auto", "bf16", "fp16", "fp32"]),
        "gradient_checkpointing": st.sampled_from(["auto", True, False]),
        "packing": st.booleans(),
        "warmup_ratio": st.floats(0, 1, exclude_max=True, **finite),
        "weight_decay": st.floats(0, 1e6, **finite),
        "max_grad_norm": st.floats(1e-9, 1e9, **finite),
        "seed": st.integers(0, 2**32 - 1),
        "eval_fraction": st.floats(0, 0.9, **finite),
        "eval_steps": st.one_of(st.none(), st.integers(1, 10**6)),
        "logging_steps": st.integers(1, 10**6),
        "report_to": st.sampled_from(["none", "tensorboard"]),
    },
)
# No surrogates (not text), and no NEL: PyYAML's emitter writes a raw U+0085 inside single quotes,
# where its own reader (YAML 1.1: NEL is a line break) folds it into a space. A dumper bug, not dlm's.
yaml_safe_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x85")
valid_top = st.fixed_dictionaries(
    {"dlm_id": st.just(ID)},
    optional={
        "dlm_version": st.integers(1, SCHEMA_VERSION),
        "base_model": st.text(yaml_safe_chars, min_size=1, max_size=20),
        "system_prompt": st.one_of(st.none(), st.text(yaml_safe_chars, max_size=40)),
        "trust_remote_code": st.booleans(),
    },
)


@fuzz("test_valid_training_values_round_trip")
@given(top=valid_top, training=valid_training, flow=st.booleans(), as_spec=st.booleans())
def test_valid_training_values_round_trip(top: dict, training: dict, flow: bool, as_spec: bool) -> None:
    """Every value the schema accepts, written as YAML, comes back equal: no YAML-1.1 surprises."""
    RAN["test_valid_training_values_round_trip"] += 1
    fm = {**top, "training": training}
    body = yaml.dump(fm, Dumper=_Dumper, default_flow_style=flow, allow_unicode=True, width=10_000)
    path, text = ("s.yaml", body) if as_spec else ("d.dlm", "---\n" + body + "---\nSome prose.\n")
    result = pipeline(text, path)
    assert result is not None, text
    _, spec = result
    for key, value in top.items():
        assert getattr(spec, key) == value, key
    for key, value in training.items():
        assert getattr(spec.training, key) == value, key


# ---------------------------------------------------------------- read_doc with generated .jsonl files

clean_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20).filter(str.strip)


@st.composite
def good_row(draw: Any) -> dict:
    shape = draw(st.sampled_from(["text", "pc", "messages"]))
    if shape == "text":
        row: dict[str, Any] = {"text": draw(clean_text)}
    elif shape == "pc":
        row = {"prompt": draw(clean_text), "completion": draw(clean_text)}
    else:
        msgs = [{"role": "system", "content": draw(clean_text)}] if draw(st.booleans()) else []
        for _ in range(draw(st.integers(1, 3))):
            msgs += [{"role": "user", "content": draw(clean_text)}, {"role": "assistant", "content": draw(clean_text)}]
        row = {"messages": msgs}
    if draw(st.booleans()):
        row["heldout"] = draw(st.booleans())
    return row


def _dump(row: Any, draw: Any) -> str:
    return json.dumps(
        row, ensure_ascii=draw(st.booleans()), separators=draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    )


@st.composite
def bad_row(draw: Any) -> tuple[str, bytes]:
    """(kind, the row's bytes): each kind is refused whatever the other rows say."""
    row = draw(good_row())
    kind = draw(
        st.sampled_from(
            [
                "truncated",
                "not-object",
                "unknown-key",
                "wrong-type",
                "blank-text",
                "mixed",
                "missing",
                "heldout-type",
                "no-messages",
                "bad-role",
                "ends-with-user",
                "late-system",
                "message-keys",
                "surrogate",
                "deep",
                "bad-utf8",
                "huge-int",
                "nan",
            ]
        )
    )
    if kind == "truncated":
        text = _dump(row, draw)
        return kind, text[: draw(st.integers(1, len(text) - 1))].encode()
    if kind == "not-object":
        return kind, json.dumps(
            draw(st.one_of(st.lists(st.integers(), max_size=2), clean_text, st.integers(), st.none(), st.booleans()))
        ).encode()
    if kind == "deep":
        return kind, b"[" * 5000 + b"]" * 5000
    if kind == "bad-utf8":
        text = _dump(row, draw).encode()
        i = draw(st.integers(0, len(text)))
        return kind, text[:i] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"])) + text[i:]
    if kind == "huge-int":
        return kind, b'{"text": ' + b"9" * 5000 + b"}"
    if kind == "nan":
        return kind, b'{"prompt": NaN, "completion": "x"}'
    shape = "text" if "text" in row else "prompt" if "prompt" in row else "messages"
    if kind == "unknown-key":
        row[draw(st.sampled_from(["complection", "txt", "role", "Text", "", "🙂"]))] = "x"
    elif kind == "wrong-type":
        key = {"text": "text", "prompt": draw(st.sampled_from(["prompt", "completion"])), "messages": "messages"}[shape]
        row[key] = draw(st.sampled_from([5, 1.5, None, True, ["x"], {"a": 1}]))
    elif kind == "blank-text":
        key = {"text": "text", "prompt": "completion", "messages": None}[shape]
        if key:
            row[key] = draw(st.sampled_from(["", " ", "\n\t"]))
        else:
            row["messages"][-1]["content"] = "  "
    elif kind == "mixed":
        row["text" if shape != "text" else "prompt"] = "x"
    elif kind == "missing":
        row = {draw(st.sampled_from(["prompt", "completion"])): "x"}
    elif kind == "heldout-type":
        row["heldout"] = draw(st.sampled_from([1, 0, "yes", None, []]))
    elif kind == "no-messages":
        row = {"messages": draw(st.sampled_from([[], {}, "hi", None]))}
    elif kind == "bad-role":
        row = {
            "messages": [
                {"role": draw(st.sampled_from(["User", "bot", "", "tool"])), "content": "x"},
                {"role": "assistant", "content": "y"},
            ]
        }
    elif kind == "ends-with-user":
        row = {"messages": [{"role": "user", "content": "x"}]}
    elif kind == "late-system":
        row = {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "y"},
            ]
        }
    elif kind == "message-keys":
        row = {"messages": [{"role": "user", "content": "x", "name": "n"}, {"role": "assistant", "content": "y"}]}
    elif kind == "surrogate":  # a JSON escape for half of a UTF-16 pair: valid JSON, not valid text
        key = {"text": "text", "prompt": "prompt", "messages": None}[shape]
        if key:
            row[key] = draw(clean_text) + draw(st.sampled_from(["\ud800", "\udfff", "\udc80"]))
        else:
            row["messages"][0]["content"] += "\ud83d"
        return kind, json.dumps(row).encode()  # ensure_ascii: the surrogate is written as an escape
    return kind, _dump(row, draw).encode()


@st.composite
def jsonl_files(draw: Any) -> tuple[list[bytes], int | None]:
    """(lines of the file, the 1-based line of the first row that must be refused, or None)."""
    rows: list[bytes] = []
    first_bad = first_bad_utf8 = None
    for _ in range(draw(st.integers(1, 8))):
        for _ in range(draw(st.integers(0, 1))):
            rows.append(draw(st.sampled_from([b"", b"  ", b"\t"])))
        if draw(st.integers(0, 3)) == 0:
            kind, line = draw(bad_row())
            rows.append(line)
            first_bad = first_bad or len(rows)
            if kind == "bad-utf8":
                first_bad_utf8 = first_bad_utf8 or len(rows)
        else:
            rows.append(_dump(draw(good_row()), draw).encode())
    return rows, first_bad_utf8 or first_bad


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-data")


def test_jsonl_data_files(data_folder: Path) -> None:
    @fuzz("test_jsonl_data_files")
    @given(
        case=jsonl_files(), ending=st.sampled_from([b"\n", b"\r\n"]), spec=st.booleans(), final_newline=st.booleans()
    )
    def check(case: tuple[list[bytes], int | None], ending: bytes, spec: bool, final_newline: bool) -> None:
        RAN["test_jsonl_data_files"] += 1
        rows, first_bad = case
        data = data_folder / "data" / "rows.jsonl"
        data.parent.mkdir(exist_ok=True)
        data.write_bytes(ending.join(rows) + (ending if final_newline else b""))
        if spec:
            doc_path = data_folder / "spec.yaml"
            doc_path.write_text(f"dlm_id: {ID}\ndata:\n  - data/rows.jsonl\n")
        else:
            doc_path = data_folder / "doc.dlm"
            doc_path.write_text(f"---\ndlm_id: {ID}\ndata: [data/rows.jsonl]\n---\nSome prose.\n")
        n_rows = sum(1 for r in rows if r.strip())
        try:
            doc = read_doc(doc_path)
            spec_ = parse_spec(doc.frontmatter, doc.positions, doc.path)
        except DlmError as exc:
            text = (ending.join(rows)).decode("utf-8", "replace")
            assert_located(exc, text, str(data))
            if n_rows == 0:
                assert (exc.line, "empty" in exc.message) == (1, True)
            else:
                assert first_bad is not None, exc.render()
                assert exc.line == first_bad, (exc.render(), rows)
            return
        assert first_bad is None and n_rows, rows
        from_data = [s for s in doc.sections if s.path == str(data)]
        assert len(from_data) == n_rows
        assert doc.data_files == (str(data),)
        check_corpus(doc, spec_)

    check()


# ---------------------------------------------------------------- the budget


def test_the_budget_was_spent() -> None:
    """When the whole file ran, at least 10,000 generated documents went through the property."""
    if set(RAN) != set(BUDGET):
        pytest.skip("only part of the fuzz suite ran")
    total = sum(RAN.values())
    print(f"\nfuzz examples: {total} ({dict(RAN)})")
    assert total >= 10_000 * min(SCALE, 1.0)
