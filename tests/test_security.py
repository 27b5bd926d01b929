"""Security defaults: nothing in a document, spec, data file or `--set` value is ever executed.

Unit tier. The static part reads dlm's own source: YAML only through SafeLoader (or a subclass),
no eval/exec/pickle/torch.load, and `trust_remote_code` only ever passed as the spec's value. The
dynamic part feeds Python-object YAML tags to the CLI and checks the command in them never ran.
The tiny-model checks (a tampered checkpoint refused by `weights_only`, a base's own Python code
never imported) are in tests/test_faults.py; docs/reliability.md lists all of them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted((REPO / "dlm").glob("*.py"))
ID = "01JC8Z3T6V7W8X9Y0Z1A2B3C4D"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_source_never_executes_or_unpickles_input(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    for node, name in _calls(tree):
        where = f"{path.name}:{node.lineno}: {name}"
        assert name not in (
            "eval",
            "exec",
            "compile",
            "__import__",
            "pickle.load",
            "pickle.loads",
            "torch.load",
            "yaml.load",
            "yaml.load_all",
            "yaml.unsafe_load",
            "yaml.full_load",
            "os.system",
            "marshal.loads",
        ), where
        if name in ("yaml.compose", "yaml.parse", "yaml.compose_all"):
            loader = next((k.value for k in node.keywords if k.arg == "Loader"), None)
            assert loader is not None and ast.unparse(loader) in ("_Loader", "yaml.SafeLoader"), where
        if name in (
            "subprocess.run",
            "subprocess.Popen",
            "subprocess.call",
            "subprocess.check_call",
            "subprocess.check_output",
            "Popen",
        ):
            # the doctor reads nvidia-smi: a fixed argument list, never a shell, never document text
            assert not any(k.arg == "shell" for k in node.keywords), where
            assert isinstance(node.args[0], (ast.List, ast.Tuple)), where
        for kw in node.keywords if name != "add" else ():  # findings' add(): evidence, not an argument
            if kw.arg == "trust_remote_code":
                # only ever the spec's own value (default False) or a parameter carrying it
                assert not (isinstance(kw.value, ast.Constant) and kw.value.value is True), where
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any("Loader" in ast.unparse(b) for b in node.bases):
            assert [ast.unparse(b) for b in node.bases] == ["yaml.SafeLoader"], f"{path.name}: {node.name}"
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = (
                [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults + node.args.kw_defaults
            )
            for arg, default in zip(args, defaults):
                if arg.arg == "trust_remote_code" and default is not None:
                    assert ast.unparse(default) == "False", f"{path.name}:{node.lineno}: {node.name}"


def test_the_spec_defaults_trust_remote_code_off() -> None:
    from dlm.doc.schema import Spec

    assert Spec(dlm_id=ID, base_model="smollm2-135m").trust_remote_code is False


def _marker_not_made(tmp_path: Path, proc: subprocess.CompletedProcess) -> None:
    assert not (tmp_path / "pwned").exists(), "a command from the input ran"
    assert "Traceback" not in proc.stderr, proc.stderr


PAYLOADS = [
    "!!python/object/apply:os.system ['touch pwned']",
    "!!python/object/new:os.system ['touch pwned']",
    "!!python/name:os.system",
    "!!python/module:os",
    "!!python/object/apply:subprocess.check_call [[touch, pwned]]",
]


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("kind", ["dlm", "yaml"])
def test_python_yaml_tags_are_refused_and_never_run(tmp_path: Path, payload: str, kind: str) -> None:
    if kind == "dlm":
        (tmp_path / "doc.dlm").write_text(
            f"---\ndlm_id: {ID}\nbase_model: smollm2-135m\nsystem_prompt: {payload}\n---\nProse.\n"
        )
    else:
        (tmp_path / "doc.yaml").write_text(f"dlm_id: {ID}\nbase_model: smollm2-135m\ntraining:\n  seed: {payload}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "dlm", "doctor", f"doc.{kind}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "hint: " in proc.stderr, proc.stderr
    _marker_not_made(tmp_path, proc)


def test_a_tag_in_a_twin_override_stays_text(tmp_path: Path) -> None:
    (tmp_path / "doc.dlm").write_text(f"---\ndlm_id: {ID}\nbase_model: smollm2-135m\n---\nProse.\n")
    proc = subprocess.run(
        [sys.executable, "-m", "dlm", "twin", "doc.dlm", "--set", f"system_prompt={PAYLOADS[0]}", "-o", "twin.dlm"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    _marker_not_made(tmp_path, proc)
    assert "system_prompt: '!!python/object/apply:os.system" in (tmp_path / "twin.dlm").read_text()
    check = subprocess.run(
        [sys.executable, "-m", "dlm", "doctor", "twin.dlm"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert check.returncode in (0, 1), check.stderr  # a valid document whose system prompt is that text
    _marker_not_made(tmp_path, check)
