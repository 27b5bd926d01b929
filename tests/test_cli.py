"""The command line as a user meets it: exit codes, error format, speed-critical imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import CONFIGS, REPO


def dlm(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dlm", *args], capture_output=True, text=True, cwd=cwd or REPO, env=env, timeout=120
    )


def test_cli_import_does_not_import_torch() -> None:
    code = (
        "import sys, dlm.cli.app, dlm.plan.doctor, dlm.plan.prepare, dlm.plan.planner, dlm.doc.grammar, dlm.doc.schema, dlm.cli.render\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets', 'numpy') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == ""


def test_doctor_on_a_file_imports_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['dlm', 'doctor', {str(CONFIGS / 'tutor.dlm')!r}]\n"
        "try:\n    runpy.run_module('dlm', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
        "print('HEAVY=' + ','.join(m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY=\n" in res.stdout or res.stdout.rstrip().endswith("HEAVY="), res.stdout[-500:] + res.stderr[-2000:]


def test_help_and_version() -> None:
    res = dlm("--help")
    assert res.returncode == 0
    for command in ("doctor", "init", "twin", "schema"):
        assert command in res.stdout
    assert dlm("--version").stdout.startswith("dlm ")


def test_schema_is_json_schema_with_every_training_key() -> None:
    res = dlm("schema")
    assert res.returncode == 0
    schema = json.loads(res.stdout)
    training = schema["$defs"]["Training"]["properties"]
    for key in (
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "use_rslora",
        "optimizer",
        "galore_rank",
        "galore_update_proj_gap",
        "galore_scale",
        "micro_batch_size",
        "grad_accum",
        "precision",
        "gradient_checkpointing",
        "packing",
        "eval_fraction",
        "report_to",
    ):
        assert key in training
    assert schema["additionalProperties"] is False


def test_init_writes_a_valid_scaffold_and_refuses_to_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "notes.dlm"
    res = dlm("init", str(target), "--adapter", "dora")
    assert res.returncode == 0, res.stderr
    text = target.read_text()
    assert "adapter: dora" in text
    assert dlm("doctor", str(target)).returncode in (0, 1)
    again = dlm("init", str(target))
    assert again.returncode == 2
    assert "already exists" in again.stderr
    assert target.read_text() == text  # nothing lost


def test_init_ids_are_fresh(tmp_path: Path) -> None:
    ids = set()
    for name in ("a.dlm", "b.dlm"):
        assert dlm("init", str(tmp_path / name)).returncode == 0
        line = next(x for x in (tmp_path / name).read_text().splitlines() if x.startswith("dlm_id:"))
        ids.add(line.split()[1])
    assert len(ids) == 2


def test_twin_gets_fresh_id_and_override_keeping_everything_else(tmp_path: Path) -> None:
    src = tmp_path / "corpus.dlm"
    src.write_text((CONFIGS / "corpus-lora.dlm").read_text())
    res = dlm("twin", str(src), "--set", "training.adapter=dora", "--set", "training.lora_dropout=0.05")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "corpus-dora-0.05.dlm"
    a, b = src.read_text().splitlines(), out.read_text().splitlines()
    changed = [(x, y) for x, y in zip(a, b) if x != y]
    assert len(a) == len(b)
    assert [y.split("#")[0].strip() for _, y in changed][1:] == ["adapter: dora", "lora_dropout: 0.05"]
    assert changed[0][0].startswith("dlm_id:") and changed[0][1].startswith("dlm_id:")
    assert "# the only key that differs" in changed[1][1]  # comments survive


def test_twin_adds_a_missing_key_and_validates(tmp_path: Path) -> None:
    src = tmp_path / "t.dlm"
    src.write_text((CONFIGS / "tutor.dlm").read_text())
    res = dlm("twin", str(src), "--set", "training.use_rslora=true", "-o", str(tmp_path / "r.dlm"))
    assert res.returncode == 0, res.stderr
    assert "use_rslora: true" in (tmp_path / "r.dlm").read_text()
    bad = dlm("twin", str(src), "--set", "training.adapter=dorra", "-o", str(tmp_path / "bad.dlm"))
    assert bad.returncode == 2
    assert "adapter" in bad.stderr and "hint:" in bad.stderr
    assert not (tmp_path / "bad.dlm").exists()
    assert "Traceback" not in bad.stderr


def test_doctor_without_files_reports_environment() -> None:
    res = dlm("doctor", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["device"] in ("cpu", "cuda", "mps")
    assert "transformers" in report["packages"]


def test_usage_error_exits_2() -> None:
    res = dlm("doctor", "--no-such-flag")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr


def test_missing_file_is_a_clean_error(tmp_path: Path) -> None:
    res = dlm("doctor", str(tmp_path / "nope.dlm"))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "hint:" in res.stderr
