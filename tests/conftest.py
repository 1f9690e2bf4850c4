"""Shared test fixtures: paths to ../shared (skip with the reason when absent), tiny models, ORT helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.shared import missing_reason, shared_file

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")


def need_shared(*parts: str) -> Path:
    """The shared file, or skip the test saying which file is missing and how to provide it."""
    p = shared_file(*parts)
    if p is None:
        pytest.skip(missing_reason(*parts))
    return p


@pytest.fixture
def cifar_test() -> Path:
    return need_shared("data", "cifar10", "test.npz")


@pytest.fixture
def cifar_train() -> Path:
    return need_shared("data", "cifar10", "train_subset.npz")


@pytest.fixture
def resnet20_weights() -> Path:
    return need_shared("models", "cifar10", "resnet20-12fca82f.th")
