"""The frontmatter's YAML, read safely with the source position of every key and list item.

A SafeLoader that also reads `2e-5` as a float, bounds on nodes built and nesting depth (a YAML bomb
is refused, not expanded), and PyYAML's problems turned into `path:line:col` errors with a hint.
Owns nothing else; `grammar.parse_doc` calls `read_yaml` on the text between the `---` lines.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from dlm.doc.text import Position, join_surrogates, line_col
from dlm.errors import DlmError

MAX_NODES = 10_000  # YAML values built, aliases counted each time they are expanded
MAX_DEPTH = 20  # nested mappings/lists; the schema itself needs 3
_MAP, _SEQ = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"


class _Loader(yaml.SafeLoader):
    """SafeLoader plus one implicit resolver: plain `2e-5` / `1E3` are floats (YAML 1.1 wants a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


_YAML_HINTS = (  # PyYAML's problem text -> what usually fixes it
    (
        "mapping values are not allowed",
        "quote a value that contains ': ' (key: \"a: b\"), or fix this line's indentation",
    ),
    ("undefined alias", "define the anchor (&name) before an alias (*name) uses it"),
    ("constructor", "dlm reads plain YAML values only: remove the '!' tag"),
    ("cannot start any token", "quote a value that starts with @, `, % or another YAML indicator"),
    ("expected ':'", "each line is `key: value`: check for a missing ':' or an unclosed quote"),
    ("document start", "nothing may follow a '...' end marker in the frontmatter"),
    ("another document", "the frontmatter is a single YAML document: remove the extra '---' or '...' line"),
)


def _yaml_hint(problem: str) -> str:
    default = "check this line's indentation (spaces only) and quoting; see docs/format.md"
    return next((hint for key, hint in _YAML_HINTS if key in problem), default)


class _Yaml:
    """Builds plain Python values from a composed node tree, recording where each key and item is."""

    def __init__(self, src: str, path: str, first_line: int) -> None:
        self.src, self.path, self.first_line = src, path, first_line
        self.positions: dict[tuple, Position] = {(): (1, 1)}
        self.nodes = 0
        self.scalars = yaml.constructor.SafeConstructor()

    def at(self, mark: Any) -> Position:
        line, col = line_col(self.src, min(mark.index, len(self.src)))
        return line + self.first_line - 1, col

    def error(self, message: str, hint: str, mark: Any) -> DlmError:
        return DlmError(message, hint, self.path, *self.at(mark))

    def from_yaml_error(self, exc: yaml.YAMLError) -> DlmError:
        if isinstance(exc, yaml.reader.ReaderError):
            line, col = line_col(self.src, exc.position)
            return DlmError(
                f"character {exc.character!r} is not allowed in YAML",
                "remove it or quote the text",
                self.path,
                line + self.first_line - 1,
                col,
            )
        if not isinstance(exc, yaml.MarkedYAMLError):
            return DlmError(f"invalid YAML: {exc}", _yaml_hint(""), self.path, self.first_line, 1)
        problem, mark = exc.problem or exc.context or "invalid YAML", exc.problem_mark or exc.context_mark
        unclosed = (
            "end of stream" in problem or "stream end" in problem or "while parsing a flow" in (exc.context or "")
        )
        if unclosed and exc.context_mark is not None:
            mark = exc.context_mark  # an unclosed quote or bracket: point where it opened
        if mark is None:
            return DlmError(f"invalid YAML: {problem}", _yaml_hint(problem), self.path, self.first_line, 1)
        if "'\\t'" in problem:
            return self.error(
                "a tab where YAML expects spaces", "YAML indents and separates with spaces only; replace the tab", mark
            )
        context = f" ({exc.context})" if exc.context and exc.problem else ""
        return self.error(f"invalid YAML: {problem}{context}", _yaml_hint(problem), mark)

    def read(self) -> dict[str, Any]:
        try:
            depth = 0  # checked on the event stream first: the composer recurses per level
            for event in yaml.parse(self.src, Loader=_Loader):
                if isinstance(event, yaml.CollectionStartEvent):
                    depth += 1
                    if depth > MAX_DEPTH:
                        raise self.error(
                            f"YAML nested deeper than {MAX_DEPTH} levels",
                            "the schema needs three levels at most",
                            event.start_mark,
                        )
                elif isinstance(event, yaml.CollectionEndEvent):
                    depth -= 1
            root = yaml.compose(self.src, Loader=_Loader)
        except yaml.YAMLError as exc:
            raise self.from_yaml_error(exc) from None
        if root is None:  # only comments: let the schema say which keys are missing
            return {}
        if not isinstance(root, yaml.MappingNode):
            shown = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
            raise self.error(
                f"the frontmatter must be a mapping of keys, not {shown}",
                "write one `key: value` per line, starting with `dlm_id: ...`",
                root.start_mark,
            )
        return self.build(root, (), 1)

    def build(self, node: yaml.Node, keys: tuple, depth: int) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            line, col = self.positions.get(keys[:1], (1, 1))
            what = f"'{keys[0]}'" if keys else "the YAML"
            raise DlmError(
                f"{what} expands to more than {MAX_NODES:,} values (each alias use is counted)",
                "this looks like a YAML alias bomb; write the values out instead of nesting aliases",
                self.path,
                line,
                col,
            )
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node)
        if depth > MAX_DEPTH:  # reachable only through aliases (the event pass caught plain nesting)
            raise self.error(
                f"YAML nested deeper than {MAX_DEPTH} levels", "remove the self-referencing alias", node.start_mark
            )
        if node.tag not in (_MAP, _SEQ):
            raise self.error(f"unsupported YAML tag {node.tag!r}", "use plain mappings and lists", node.start_mark)
        if isinstance(node, yaml.SequenceNode):
            out = []
            for i, item in enumerate(node.value):
                self.positions[keys + (i,)] = self.at(item.start_mark)
                out.append(self.build(item, keys + (i,), depth + 1))
            return out
        return self.mapping(node, keys, depth)

    def mapping(self, node: yaml.MappingNode, keys: tuple, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        # Merge keys (`<<: *defaults`) first, so explicit keys override them, values and positions alike.
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for src in reversed(sources):  # the first source listed wins
                    if not isinstance(src, yaml.MappingNode):
                        raise self.error(
                            "a merge key (<<) needs a mapping or a list of mappings",
                            "merge an anchored mapping: <<: *name",
                            src.start_mark,
                        )
                    out.update(self.build(src, keys, depth + 1))  # counted like any other node
        seen: dict[str, Position] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, pos = self.key(key_node), self.at(key_node.start_mark)
            if key in seen:
                raise DlmError(
                    f"duplicate key '{key}' (first set on line {seen[key][0]})",
                    "remove one of them; YAML would silently keep the last",
                    self.path,
                    *pos,
                )
            seen[key] = pos
            self.positions[keys + (key,)] = pos
            out[key] = self.build(value_node, keys + (key,), depth + 1)
        return out

    def key(self, node: yaml.Node) -> str:
        self.nodes += 1
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(
                "a key must be a plain name, not a list or mapping", "write `name: value`", node.start_mark
            )
        value = self.scalar(node)
        if value is None:
            raise self.error("a key is missing (nothing before the ':')", "write `name: value`", node.start_mark)
        if not isinstance(value, str):
            hint = f"quote it: '{node.value}': ..."
            if isinstance(value, bool):
                hint += " (YAML 1.1 reads yes/no/on/off as true/false)"
            raise self.error(f"key {node.value!r} is read as {type(value).__name__}, not a name", hint, node.start_mark)
        return value

    def scalar(self, node: yaml.ScalarNode) -> Any:
        try:
            value = self.scalars.construct_object(node)
        except yaml.YAMLError as exc:  # an unknown tag such as !!python/object
            raise self.from_yaml_error(exc) from None
        except (ValueError, TypeError, OverflowError, KeyError, AttributeError, IndexError):
            # e.g. a date like 2001-13-45, or an explicit tag PyYAML's constructor cannot honour:
            # `!!bool maybe` (KeyError), `!!timestamp x` (AttributeError); found by tests/test_fuzz.py
            raise self.error(
                f"cannot read the value {node.value!r} as {node.tag.rsplit(':', 1)[-1]}",
                "quote it to keep it as text, or remove the !! tag",
                node.start_mark,
            ) from None
        # Found by tests/test_fuzz.py: a double-quoted "\ud800" escape builds a lone surrogate, which
        # check_text never sees (the file itself is valid UTF-8) and which crashed later, in hashing,
        # path handling or printing, with UnicodeEncodeError. PyYAML also leaves a JSON-style pair
        # "\ud83d\ude00" as two halves: join pairs into their character, refuse a lone half here.
        if isinstance(value, str):
            value = join_surrogates(value)
            if value is None:
                raise self.error(
                    "a \\u escape in this value is half of a UTF-16 surrogate pair, which is not text",
                    "write the character itself, or escape it whole (\\U0001F600 or the pair \\ud83d\\ude00)",
                    node.start_mark,
                )
        return value


def read_yaml(src: str, path: str, first_line: int = 1) -> tuple[dict[str, Any], dict[tuple, Position]]:
    """YAML text -> (mapping, positions); `first_line` is the file line the YAML text starts on."""
    reader = _Yaml(src, path, first_line)
    return reader.read(), reader.positions
