"""The memory estimate a preflight compares with free memory: it follows the settings that hold
memory (batch, rollouts per backward, budget), not those that only add time (issue 27)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from smart_r1.config import load_config
from smart_r1.distributed.memory_estimate import (
    CUDA_CONTEXT, MEASURED, GiB, estimate_peak_bytes, stage_peak_bytes, unit_costs,
)

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


@pytest.fixture(scope="module")
def tiny():
    return load_config(PIPELINES / "tiny.yaml")


def _stage(config, kind):
    return next(s for s in config.stages if s.kind == kind)


def test_estimate_per_process_kind(tiny):
    peaks = estimate_peak_bytes(tiny)
    assert set(peaks) == {"learner", "rollout_worker"}
    fixed = unit_costs("test", 64, "float32").bc.fixed
    assert all(v > fixed for v in peaks.values())
    on_gpu = estimate_peak_bytes(dataclasses.replace(tiny, ray=dataclasses.replace(tiny.ray, use_gpu=True)))
    assert on_gpu["learner"] > peaks["learner"] + CUDA_CONTEXT // 2  # the CUDA context is counted


def test_mpo_learner_memory_is_one_chunk_not_the_step(tiny):
    mpo = _stage(tiny, "mpo")
    learner = lambda **kw: stage_peak_bytes(tiny, dataclasses.replace(mpo, **kw))["learner"]  # noqa: E731
    assert learner(scenarios_per_step=64) == learner(scenarios_per_step=2)  # more scenes: more backward passes
    whole = learner(num_rollouts=32)
    assert learner(num_rollouts=32, rollouts_per_backward=4) < whole == learner(num_rollouts=32, rollouts_per_backward=32)


def test_supervised_learner_memory_follows_the_batch_and_its_budget(tiny):
    for kind in ("bc", "catk_sft"):
        stage = dataclasses.replace(_stage(tiny, kind), batch_scenarios=2)
        learner = lambda **kw: stage_peak_bytes(tiny, dataclasses.replace(stage, **kw))["learner"]  # noqa: E731
        small, big = learner(), learner(batch_scenarios=64)
        assert big > 10 * (small - unit_costs("test", 64, "float32").bc.fixed)
        budget = 1.01 * small / GiB  # room for about two scenes
        assert small <= learner(batch_scenarios=64, memory_budget_gb=budget) <= budget * GiB


def test_a_float32_process_is_bounded_by_twice_a_bfloat16_entry():
    entry = MEASURED[0]
    other = "float32" if entry.precision == "bfloat16" else "bfloat16"
    got = unit_costs(entry.preset, entry.vocab_size, other)
    factor = 2 if other == "float32" else 1
    assert got.mpo.agent == factor * entry.mpo.agent and got.rollout.fixed == factor * entry.rollout.fixed


def test_a_preset_made_wider_is_sized_with_the_largest_measured_costs():
    """A measured preset is sized with its own costs; one whose width or depth the config changes
    has no measurement and gets the `default` preset's (SMART-tiny, the largest), never the smaller
    preset's."""
    cpu = load_config(PIPELINES / "sft_rft_sft.yaml")
    wide = load_config(PIPELINES / "sft_rft_sft.yaml", ["model.dim=128"])
    assert estimate_peak_bytes(cpu) != estimate_peak_bytes(wide)
    for stage in cpu.stages:
        ours, theirs = stage_peak_bytes(cpu, stage), stage_peak_bytes(wide, stage)
        assert all(theirs[kind] > ours[kind] for kind in ours), stage.name
