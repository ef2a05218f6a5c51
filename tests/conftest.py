"""Shared fixtures: one thread per process, a per-checkout model cache, the tiny model built once."""

from __future__ import annotations

import os
from pathlib import Path

# Before torch is imported anywhere: two 2-thread processes on 2 cores make a step ~50x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("QLORA_CACHE", str(Path(__file__).resolve().parents[1] / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    """The tiny model's folder (built on first use into the checkout's .cache/)."""
    from qlora.tiny import tiny_model_path

    return tiny_model_path()
