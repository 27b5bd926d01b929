"""The house rules of docs/architecture.md that no other test states: every shipped config plans on
every hardware fixture and binds to the real PEFT/TRL signatures, and the package installs from a
wheel (subpackages found by discovery) and runs `dlm doctor` from there."""

from __future__ import annotations

import inspect
import subprocess
import sys
import sysconfig
import warnings
import zipfile
from pathlib import Path

import pytest
from conftest import CONFIGS, REPO

from dlm.plan.hardware import load_fixture
from dlm.plan.prepare import prepare

FIXTURES = sorted((REPO / "tests" / "fixtures" / "hardware").glob("*.json"))
SHIPPED = sorted([*CONFIGS.glob("*.dlm"), *CONFIGS.glob("*.yaml")])


def test_the_fixtures_and_configs_are_there() -> None:
    """A glob that finds nothing would make the tests below pass vacuously."""
    assert {f.stem for f in FIXTURES} >= {"cpu", "t4", "a100-40g", "h100", "mps"}
    assert len(SHIPPED) >= 5 and (CONFIGS / "tutor.dlm") in SHIPPED


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.stem)
@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_plans_on_every_hardware_fixture(config: Path, fixture: Path) -> None:
    p = prepare(config, load_fixture(fixture)).plan
    assert p.reason.startswith("reason: ") and p.lora_kwargs["r"] >= 1
    assert p.sft_kwargs["max_length"] >= 1 and p.estimates.peak_memory_bytes > 0


@pytest.mark.integration
@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_binds_to_the_real_lora_and_sft_configs(config: Path, tmp_path: Path) -> None:
    """The plan's kwargs go through `peft.LoraConfig` on every fixture and through TRL's `SFTConfig` for
    real on the CPU fixture (SFTConfig inspects the device it is built on); an upstream rename fails here."""
    import peft
    import trl

    from dlm.train.run import sft_config

    sft_params = set(inspect.signature(trl.SFTConfig).parameters)
    for fixture in FIXTURES:
        p = prepare(config, load_fixture(fixture)).plan
        lora = peft.LoraConfig(**p.lora_kwargs)
        assert lora.r == p.lora_kwargs["r"] and lora.use_dora == p.lora_kwargs.get("use_dora", False)
        assert set(p.sft_kwargs) <= sft_params, (fixture.stem, set(p.sft_kwargs) - sft_params)
        dpo_params = set(inspect.signature(trl.DPOConfig).parameters)  # objective dpo (configs/preference.dlm)
        assert set(p.dpo_kwargs) <= dpo_params, (fixture.stem, set(p.dpo_kwargs) - dpo_params)
    cpu = prepare(config, load_fixture(REPO / "tests" / "fixtures" / "hardware" / "cpu.json")).plan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = sft_config(cpu, tmp_path / "out")
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]
    assert cfg.max_length == cpu.sft_kwargs["max_length"] and cfg.learning_rate == cpu.sft_kwargs["learning_rate"]


@pytest.mark.integration
def test_the_wheel_ships_every_subpackage_and_runs_doctor(tmp_path: Path) -> None:
    """`pip wheel .` then a fresh venv with only that wheel (its dependencies lent from this venv
    through a .pth file, not the source tree): `dlm doctor configs/tutor.dlm` works from the wheel."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(REPO)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
        timeout=300,
    )
    (wheel,) = dist.glob("dlm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = sorted({n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")})
    assert packages == ["dlm", "dlm/cli", "dlm/doc", "dlm/plan", "dlm/store", "dlm/train", "dlm/use"]
    assert not [n for n in names if n.startswith(("bench/", "tests/"))]

    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True, timeout=120)
    py = fresh / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # Only the dependencies come from this venv: a .pth names its site-packages, whose own .pth files
    # (the editable install of the source tree) are not processed from there.
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = subprocess.run(
        [str(py), "-c", "import dlm.cli.app, dlm; print(dlm.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(fresh)), where.stdout
    res = subprocess.run(
        [str(fresh / "bin" / "dlm"), "doctor", str(CONFIGS / "tutor.dlm")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "reason: precision=" in res.stdout
