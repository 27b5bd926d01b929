"""Several processes: `dlm train` under torchrun and `accelerate launch` (DDP, gloo on the CPU).

What must hold (docs/scaling.md): the command runs unchanged; only rank 0 prints progress and writes
the store; the planner counts the world size in the effective batch; both ranks end with the same
adapter, and it is the one in the store; a Ctrl-C stops every rank at the same step with a
checkpoint that `--resume` continues. The launcher reading and the doctor's refusals are unit tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dlm.plan.hardware import launch_env
from tests.test_commands import DLM, write_doc

BIN = Path(sys.executable).parent
ID = "01JC8Z3T6V7W8X9Y0Z1A2B3C4D"


# ---------------------------------------------------------------- unit: the launcher's environment


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, (1, "none")),
        ({"WORLD_SIZE": "4"}, (4, "none")),
        ({"WORLD_SIZE": "nonsense"}, (1, "none")),
        ({"WORLD_SIZE": "8", "ACCELERATE_USE_FSDP": "true"}, (8, "fsdp")),
        ({"WORLD_SIZE": "8", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, (8, "zero3")),
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, (2, "zero2")),
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"}, (2, "zero0")),
    ],
)
def test_launch_env(env: dict, expected: tuple) -> None:
    assert launch_env(env) == expected


def _doctor(tmp_path: Path, training: str, **env: str) -> subprocess.CompletedProcess:
    doc = tmp_path / "d.dlm"
    doc.write_text(f"---\ndlm_id: {ID}\nbase_model: smollm2-135m\ntraining:\n{training}---\nSome prose.\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("WORLD_SIZE", "ACCELERATE_"))}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "dlm",
            "doctor",
            "--json",
            "--hardware",
            str(Path(__file__).parent / "fixtures" / "hardware" / "h100.json"),
            str(doc),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **env},
    )


def test_doctor_plans_the_launch_it_is_told_about(tmp_path: Path) -> None:
    """`WORLD_SIZE=8 ACCELERATE_USE_FSDP=true dlm doctor FILE` plans (and refuses) as `dlm train`
    will under that launcher; without the variables the same file is fine."""
    galore = "  optimizer: galore_adamw\n"
    alone = _doctor(tmp_path, galore)
    assert alone.returncode == 0, alone.stderr
    sharded = _doctor(tmp_path, galore, WORLD_SIZE="8", ACCELERATE_USE_FSDP="true")
    assert sharded.returncode == 1, sharded.stderr
    plan = json.loads(sharded.stdout)["files"][0]["plan"]
    assert plan["world_size"] == 8 and plan["sharding"] == "fsdp"
    assert "galore-sharded" in {f["code"] for f in plan["findings"] if f["level"] == "block"}
    layerwise = _doctor(tmp_path, "  optimizer: galore_adamw_layerwise\n  grad_accum: 1\n", WORLD_SIZE="2")
    assert layerwise.returncode == 1 and "galore-layerwise-accum" in layerwise.stdout


# ---------------------------------------------------------------- integration: two processes on the CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, ranks: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_"))}
    return {**env, "DLM_HOME": str(home), "DLM_RANK_DIR": str(ranks), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


def _check_one_adapter(doc: Path, home: Path, ranks: Path, out: str, steps: int) -> dict:
    """One store, one run, one version; rank 1's own copy of the adapter equals the stored one."""
    assert out.count("reason: ") == 1, "the plan must be printed once (rank 0)"
    assert out.count(f"step {steps}/{steps}") == 1 and out.count("version v0001") == 1
    dlm_id = doc.read_text().split("dlm_id: ")[1].split()[0]
    root = home / "store" / dlm_id
    manifest = json.loads((root / "manifest.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["ok"] and manifest["current"] == "v0001"
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["r0001"]
    stored = (root / "versions" / "v0001" / "adapter_model.safetensors").read_bytes()
    assert (ranks / "rank1" / "adapter" / "adapter_model.safetensors").read_bytes() == stored
    assert not (ranks / "rank1" / "manifest.json").exists()
    plan = json.loads((root / "versions" / "v0001" / "plan.json").read_text())
    assert plan["world_size"] == 2
    decided = {d["key"]: d["value"] for d in plan["decisions"]}
    kw = plan["sft_kwargs"]
    assert decided["effective_batch"] == kw["per_device_train_batch_size"] * kw["gradient_accumulation_steps"] * 2
    assert decided["processes"] == "2 x ddp" and kw["ddp_find_unused_parameters"] is False
    return manifest


@pytest.mark.integration
def test_torchrun_two_processes_train_one_adapter(workdir: Path, tmp_path: Path) -> None:
    doc = write_doc(workdir, "ddp.dlm", steps=4)
    home, ranks = tmp_path / "home", tmp_path / "ranks"
    proc = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", DLM, "train", doc.name],
        cwd=workdir,
        env=_env(home, ranks),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    _check_one_adapter(doc, home, ranks, proc.stdout, 4)


@pytest.mark.integration
def test_accelerate_launch_two_processes_train_one_adapter(workdir: Path, tmp_path: Path) -> None:
    """`accelerate launch --multi_gpu` starts torchrun's workers; on a machine without GPUs they run
    on the CPU with gloo (`--cpu` would start a single process instead)."""
    doc = write_doc(workdir, "accel.dlm", steps=4)
    home, ranks = tmp_path / "home", tmp_path / "ranks"
    cmd = [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        DLM,
        "train",
        doc.name,
    ]
    proc = subprocess.run(cmd, cwd=workdir, env=_env(home, ranks), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    _check_one_adapter(doc, home, ranks, proc.stdout, 4)


@pytest.mark.integration
def test_ctrl_c_under_torchrun_stops_every_rank_at_one_checkpoint(workdir: Path, tmp_path: Path) -> None:
    """SIGINT to the launcher's whole process group, as a terminal's Ctrl-C sends it (torchrun then
    forwards it once more): every rank stops after the same step, rank 0 saves the checkpoint and
    marks the run interrupted, and `--resume` under torchrun finishes it."""
    doc = write_doc(workdir, "ddp-int.dlm", steps=20, extra="  save_steps: 1\n  precision: fp32\n")
    home, ranks = tmp_path / "home", tmp_path / "ranks"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", DLM, "train", doc.name]
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        env=_env(home, ranks),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= 3:
            os.killpg(proc.pid, signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert "--resume" in out, (out[-2000:], err[-3000:])
    dlm_id = doc.read_text().split("dlm_id: ")[1].split()[0]
    root = home / "store" / dlm_id
    manifest = json.loads((root / "manifest.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["interrupted"] and manifest["current"] is None
    stopped = json.loads(
        max((root / "runs" / "r0001" / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
        .joinpath("trainer_state.json")
        .read_text()
    )["global_step"]
    assert stopped < 20
    done = subprocess.run(
        [*cmd, "--resume"], cwd=workdir, env=_env(home, ranks), capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    manifest = json.loads((root / "manifest.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["interrupted", "ok"] and manifest["current"] == "v0001"
    assert manifest["runs"][-1]["metrics"]["steps"] == 20
    stored = (root / "versions" / "v0001" / "adapter_model.safetensors").read_bytes()
    assert (ranks / "rank1" / "adapter" / "adapter_model.safetensors").read_bytes() == stored
