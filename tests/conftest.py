"""Shared test fixtures: the real WOMD scenario from ../shared and the official evaluator's env."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# glibc reads MALLOC_* at process start, so for this process they come from the Makefile's
# exports (`make test`); set here they still reach the Ray workers and subprocesses that run the
# official evaluator (2x faster when glibc keeps TensorFlow's big buffers). Also quiets TF.
for _k, _v in {
    "MALLOC_MMAP_THRESHOLD_": "17179869184",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
    "MALLOC_TOP_PAD_": "1073741824",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "RAY_DEDUP_LOGS": "0",
}.items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[1]
SHARED_SCENARIO = REPO.parent / "shared" / "womd" / "motion_data_one_scenario.tfrecord"


@pytest.fixture(scope="session")
def womd_path() -> Path:
    """The real WOMD scenario 637f20cafde22ff8 shipped beside the checkout."""
    if not SHARED_SCENARIO.exists():
        pytest.skip(f"real WOMD scenario not found at {SHARED_SCENARIO}")
    return SHARED_SCENARIO


@pytest.fixture(scope="session")
def womd_record(womd_path):
    from smart_r1.data.womd import read_scenarios

    return next(read_scenarios(womd_path))
