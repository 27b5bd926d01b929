"""Exact token counts with the base's own tokenizer, before any weights load and without torch.

Training sees each example as `dlm.train.rows` renders and encodes it: the chat template turns a
question into a prompt ending with the generation prompt, the completion is what the template writes
after it (answer and end-of-turn), eos is appended, and the fast tokenizer encodes prompt + completion
with its special-token handling; a multi-turn conversation is the whole text `dlm.plan.chat.layout`
makes of it. This module does the same with only the `tokenizers` package (the
base folder's `tokenizer.json`) and jinja2 (the template rendered as transformers renders it), so
`dlm doctor` can give the planner every example's real length and stay instant, and
`tests/test_tokens.py` checks the lengths against `encode_rows(rows(...))` with transformers.

Where the tokenizer comes from mirrors `dlm.train.basefolder.materialize`, minus the conversion: a
base that is not on disk yet is estimated (`corpus.Example.est_tokens`), and the plan says so.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlm.fsutil import atomic_write
from dlm.plan import chat
from dlm.plan.bases import ALIASES, BaseFacts, cached_snapshot
from dlm.plan.corpus import Example

# The layout of a question without a chat template; the same string as dlm.train.rows.FALLBACK_PROMPT
# (the plan may not import the training side; tests/test_tokens.py checks they are equal).
FALLBACK_PROMPT = "### Question\n{prompt}\n\n### Answer\n"
# The named special tokens transformers passes to every chat template (`special_tokens_map`).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CONVERTED = "dlm-base.json"  # dlm.train.basefolder writes it last: a folder without it is not converted
CACHE_VERSION = 1  # of $DLM_HOME/cache/tokens/*.json; a change of how examples are counted bumps it


@dataclass(frozen=True)
class ChatTokenizer:
    """What `rows` and `encode_rows` read from a transformers tokenizer, rebuilt from its files."""

    name: str  # whose tokenizer, for the plan's reasons
    backend: Any  # tokenizers.Tokenizer, set up as transformers' fast tokenizer sets it up
    template: Any  # the compiled chat template (jinja2.Template), or None
    special: dict[str, str]  # named special tokens, as the template sees them
    bos_prefix: str  # the BOS text the template writes that the tokenizer also adds itself, else ''

    @property
    def eos(self) -> str:
        return self.special.get("eos_token", "")


def find_folder(base: BaseFacts, home: Path | None) -> tuple[Path | None, str]:
    """(the folder `dlm train` would load the base from, if it is on disk; else None and why not).

    The same places as `basefolder.materialize`, without converting or downloading: the embedded
    alias converted under `$DLM_HOME/bases/<alias>/`, a `.gguf` file converted under
    `$DLM_HOME/bases/gguf-*/` (found by its marker, not by hashing a file of gigabytes), a local folder,
    or a Hugging Face cache snapshot."""
    if base.kind in ("folder", "hub"):
        return Path(base.location), ""
    if base.kind == "alias" and not ALIASES[base.name].gguf_package:
        snap = cached_snapshot(ALIASES[base.name].hub_id)
        return (snap, "") if snap is not None else (None, f"{base.name} is not in the local Hugging Face cache")
    later = "; the first `dlm train` converts it"
    if home is None:
        return None, f"{base.name} is converted on first use{later}"
    if base.kind == "alias":
        folder = Path(home).expanduser() / "bases" / base.name
        return (folder, "") if (folder / CONVERTED).is_file() else (None, f"{base.name} is not converted yet{later}")
    gguf = Path(base.location)
    size = gguf.stat().st_size if gguf.is_file() else -1
    for marker in sorted((Path(home).expanduser() / "bases").glob(f"gguf-*/{CONVERTED}")):
        try:
            seen = json.loads(marker.read_text("utf-8"))
        except (OSError, ValueError):
            continue
        if seen.get("gguf") == str(gguf) and seen.get("gguf_bytes") == size:
            return marker.parent, ""
    return None, f"{gguf.name} is not converted yet{later}"


def load(folder: Path, name: str) -> ChatTokenizer | None:
    """The fast tokenizer and chat template of a base folder; None without a `tokenizer.json`.

    As transformers' `TokenizersBackend` (transformers 5) sets itself up: special tokens named in
    `tokenizer_config.json` that the backend lacks are added as special tokens; explicit
    `add_bos_token` / `add_eos_token` (or no post-processor at all) rebuild the post-processor;
    truncation and padding are off. The template: `chat_template.jinja`, else the config's
    `chat_template` (its `default` when it lists several)."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        return None
    from tokenizers import AddedToken, Tokenizer

    backend = Tokenizer.from_file(str(file))
    backend.no_truncation()
    backend.no_padding()
    config = _read_json(folder / "tokenizer_config.json")
    legacy = _read_json(folder / "special_tokens_map.json")
    special = {k: _content(config.get(k, legacy.get(k))) for k in SPECIAL_TOKENS}
    special = {k: v for k, v in special.items() if v}
    have = {t.content for t in backend.get_added_tokens_decoder().values()}
    wanted = [_added(AddedToken, v) for v in (config.get("added_tokens_decoder") or {}).values()]
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    wanted += [AddedToken(t, special=True, normalized=False) for t in (*special.values(), *_contents(extra))]
    missing = {t.content: t for t in wanted if t.content and t.content not in have}
    backend.add_special_tokens([t for t in missing.values() if t.special])
    backend.add_tokens([t for t in missing.values() if not t.special])
    if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
        _post_processor(backend, special, bool(config.get("add_bos_token")), bool(config.get("add_eos_token")))
    template = _template_text(folder, config)
    bos = special.get("bos_token", "")
    first = backend.encode("x").ids
    prefix = bos if bos and first and first[0] == backend.token_to_id(bos) else ""
    return ChatTokenizer(name, backend, _compile(template) if template else None, special, prefix)


def render_chat(tok: ChatTokenizer, prompt: str, answer: str | None, system: str | None) -> tuple[str, str]:
    """`dlm.train.rows.render_chat`, line for line: (prompt text, completion text)."""
    if tok.template is None:
        return FALLBACK_PROMPT.format(prompt=prompt), answer or ""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    try:
        head = _render(tok, messages, add_generation_prompt=True)
    except Exception:
        if not system:
            raise
        # Some templates (Gemma's) refuse a system role: fold the system text into the question.
        messages = [{"role": "user", "content": f"{system}\n\n{prompt}"}]
        head = _render(tok, messages, add_generation_prompt=True)
    completion = answer or ""
    if answer is not None:
        full = _render(tok, [*messages, {"role": "assistant", "content": answer}], add_generation_prompt=False)
        if full.startswith(head):
            completion = full[len(head) :].rstrip()
    if tok.bos_prefix and head.startswith(tok.bos_prefix):
        head = head[len(tok.bos_prefix) :]
    return head, completion


def conversation(tok: ChatTokenizer, ex: Example) -> chat.Layout:
    """A multi-turn example laid out as `dlm.train.rows` lays it out (the same `dlm.plan.chat.layout`)."""
    render = None if tok.template is None else (lambda m, g: _render(tok, m, add_generation_prompt=g))
    pairs = [*ex.history, (ex.prompt, ex.completion)]
    return chat.layout(pairs, ex.system, render, eos=tok.eos, bos_prefix=tok.bos_prefix, fallback=FALLBACK_PROMPT)


def row(tok: ChatTokenizer, ex: Example) -> dict[str, str]:
    """The TRL row `dlm.train.rows.rows` makes of one single-turn example."""
    if ex.kind == "prose":
        return {"prompt": "", "completion": ex.text}
    head, completion = render_chat(tok, ex.prompt, ex.completion, ex.system)
    return {"prompt": head, "completion": completion}


def lengths(tok: ChatTokenizer, examples: Iterable[Example]) -> dict[str, int]:
    """Example id -> len(input_ids) that `encode_rows` gives its row, untruncated (eos appended)."""
    exs = list(examples)
    texts = []
    for ex in exs:
        if ex.history:  # a conversation: its whole text, eos included
            texts.append(conversation(tok, ex).text)
            continue
        r = row(tok, ex)
        completion = r["completion"] if r["completion"].endswith(tok.eos) else r["completion"] + tok.eos
        texts.append(r["prompt"] + completion)
    encoded = tok.backend.encode_batch(texts, add_special_tokens=True) if texts else []
    return {ex.id: len(enc.ids) for ex, enc in zip(exs, encoded, strict=True)}


def count(
    base: BaseFacts,
    examples: Iterable[Example],
    *,
    home: Path | None = None,
    folder: Path | None = None,
    cache_name: str = "",
) -> tuple[dict[str, int] | None, str]:
    """(example id -> exact tokens, "") with the tokenizer of `folder`, else the one `find_folder`
    finds; or (None, why the counts are estimated).

    With `home` and `cache_name` (the document's dlm_id) the counts are kept in
    `$DLM_HOME/cache/tokens/<dlm_id>.json`, keyed by each example's text and the tokenizer files'
    size and mtime, so `dlm doctor` on a document it has seen skips loading the tokenizer (~0.2 s);
    `dlm train` (which passes `folder`) always counts afresh and refreshes the file. A tokenizer or
    template that cannot be used is a reason to estimate, not an error: training loads the same
    files and reports the real error there."""
    exs, fresh = list(examples), folder is not None
    if folder is None:
        folder, why = find_folder(base, home)
        if folder is None:
            return None, why
    file = Path(home).expanduser() / "cache" / "tokens" / f"{cache_name}.json" if home and cache_name else None
    stamp, keys = _stamp(folder), {ex.id: _key(ex) for ex in exs}
    cached = {} if fresh or file is None else _read_cache(file, stamp)
    if cached and all(k in cached for k in keys.values()):
        return {i: cached[k] for i, k in keys.items()}, ""
    try:
        tok = load(folder, base.name)
        if tok is None:
            return None, f"no tokenizer.json in {folder}"
        counts = lengths(tok, exs)
    except ImportError as exc:
        return None, f"the tokenizers and jinja2 packages are needed to count ({exc})"
    except Exception as exc:  # tokenizers and jinja2 raise their own types for damaged files and templates
        return None, f"{base.name}'s tokenizer could not be used ({type(exc).__name__}: {exc})"[:300]
    if file is not None:
        body = {"version": CACHE_VERSION, "tokenizer": stamp, "counts": {keys[i]: n for i, n in counts.items()}}
        try:
            atomic_write(file, json.dumps(body, sort_keys=True) + "\n")
        except OSError:  # a read-only home only costs the next doctor the ~0.2 s
            pass
    return counts, ""


# --- helpers -------------------------------------------------------------------------------------


def _key(ex: Example) -> str:
    """What an example's count depends on besides the tokenizer (its id leaves out a preference's system)."""
    parts = [ex.kind, ex.system, ex.prompt, ex.completion, ex.text] + ([ex.history] if ex.history else [])
    text = json.dumps(parts, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def _stamp(folder: Path) -> str:
    """The tokenizer files as the count cache knows them: where, how big, when last written."""
    files = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
    seen = [(n, st.st_size, st.st_mtime_ns) for n in files if (st := _stat(folder / n)) is not None]
    return json.dumps([str(folder.resolve()), seen])


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def _read_cache(file: Path, stamp: str) -> dict[str, int]:
    try:
        body = json.loads(file.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    ok = isinstance(body, dict) and body.get("version") == CACHE_VERSION and body.get("tokenizer") == stamp
    counts = body.get("counts") if ok else None
    return {k: n for k, n in counts.items() if isinstance(n, int)} if isinstance(counts, dict) else {}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text("utf-8"))
    return data if isinstance(data, dict) else {}


def _content(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken mapping."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _contents(values: Any) -> list[str]:
    values = values.values() if isinstance(values, dict) else [values] if isinstance(values, str) else values
    return [c for c in (_content(v) for v in values) if c] if isinstance(values, Iterable) else []


def _added(added_token: Any, entry: Any) -> Any:
    """An AddedToken from a tokenizer_config.json `added_tokens_decoder` entry, with its flags."""
    entry = entry if isinstance(entry, dict) else {"content": _content(entry)}
    flags = {k: bool(entry[k]) for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in entry}
    return added_token(str(entry.get("content") or ""), **flags)


def _post_processor(backend: Any, special: dict[str, str], add_bos: bool, add_eos: bool) -> None:
    """transformers' `update_post_processor`: BOS / EOS around each sequence, as the config asks."""
    from tokenizers import processors

    bos, eos = special.get("bos_token") or "", special.get("eos_token") or ""
    add_bos, add_eos = add_bos and bool(bos), add_eos and bool(eos)
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    tokens = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=tokens)


def _template_text(folder: Path, config: dict[str, Any]) -> str:
    file = folder / "chat_template.jinja"
    if file.is_file():
        return file.read_text("utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: transformers uses "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else ""


def _render(tok: ChatTokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    # transformers passes the named special tokens, then tools/documents (None here).
    return tok.template.render(
        **tok.special, messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt
    )


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> Any:
    """The template compiled as transformers compiles it: a sandbox with trim_blocks, lstrip_blocks,
    loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII, and the
    `{% generation %}` tag (training-mask markers) rendered as plain text."""
    from datetime import datetime

    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
