"""Shared test set-up: every test runs offline and with its own DLM_HOME unless it asks otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Nothing in the tests may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh DLM_HOME for one test."""
    h = tmp_path / "dlm-home"
    h.mkdir()
    monkeypatch.setenv("DLM_HOME", str(h))
    return h


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the tiny random Llama as `./tiny`, for documents that name `base_model: ./tiny`
    (one per test module; building it takes about a second)."""
    from tests.tinymodel import tiny_base

    folder = tmp_path_factory.mktemp("docs")
    tiny_base(folder / "tiny")
    return folder
