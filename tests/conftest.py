"""Shared test setup: offline hub, small thread counts, paths to ../shared data."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No GPU here: Triton kernels run in its interpreter, which must be chosen before triton loads.
if not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

# Tiny models: one thread is faster than two fighting (and than oversubscribed CI cores).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present (the shared data folder beside the repo)")
    return SHARED


@pytest.fixture(scope="session", autouse=True)
def _wattkd_cache(tmp_path_factory: pytest.TempPathFactory):
    """One cache (bundled tokenizer, ...) per test session, never the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WATTKD_CACHE", str(tmp_path_factory.getbasetemp() / "wattkd-cache"))
        yield
