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


def require_shared(path: Path) -> Path:
    """`path` (data under ../shared), else skip the test: locally the folder is optional. In
    CI (CI=true, as GitHub Actions sets) a missing folder fails the test, loudly: the eval
    data tests must never turn into silent skips there."""
    if not path.exists():
        why = f"{path} not present (the shared data folder beside the repo)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{why}; CI must provide it", pytrace=False)
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return require_shared(SHARED)


@pytest.fixture(scope="session", autouse=True)
def _wattkd_cache(tmp_path_factory: pytest.TempPathFactory):
    """One cache (bundled tokenizer, ...) per test session, never the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WATTKD_CACHE", str(tmp_path_factory.getbasetemp() / "wattkd-cache"))
        yield
