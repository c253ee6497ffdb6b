"""Two learner ranks in the RFT stage: each samples its own share of every RL step's scenarios
through the rollout queue (no rank broadcasts experience), their weights stay identical, and the
logged means are over both ranks' scenarios. A config in which a rank would get no scenario is
refused before any cluster work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray
import torch

from smart_r1.config import MPOStage, PipelineConfig, RayConfig, SamplingConfig
from smart_r1.distributed.learner import run_learner
from smart_r1.distributed.mpo_loop import ROLLOUTS_LOG, step_scenarios, weights_digest
from smart_r1.distributed.rollout_worker import start_workers
from smart_r1.distributed.worker_kit import LearnerJob
from smart_r1.model.checkpoint import load_checkpoint, save_checkpoint
from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.ray_runtime import ensure_ray
from smart_r1.tokens.motion_vocab import build_vocab

STEPS, PER_STEP, WORLD = 3, 4, 2


def test_a_rank_without_scenarios_is_refused():
    stage = MPOStage(name="rft", scenarios_per_step=2)
    with pytest.raises(ValueError, match=r"scenarios_per_step \(2\) is below ray.num_learners \(3\)"):
        PipelineConfig(stages=(stage,), ray=RayConfig(num_learners=3)).validate()
    PipelineConfig(stages=(stage,), ray=RayConfig(num_learners=2)).validate()


@pytest.mark.slow
def test_two_ranks_sample_their_own_shares_and_stay_identical(sumo_shards, tmp_path):
    from smart_r1.data.index import scenario_index

    index = scenario_index(str(sumo_shards))
    records = index.read(list(range(len(index))))
    torch.manual_seed(0)
    vocab = build_vocab(records, size=ModelConfig.preset("test").vocab_size, iters=3)
    path = tmp_path / "init.pt"
    save_checkpoint(path, SmartTiny(ModelConfig.preset("test"), vocab))
    ensure_ray(num_cpus=2)
    datasets = {"train": str(sumo_shards)}
    workers = start_workers(str(path), datasets, count=1, cpus=1, gpus=0.0)
    stage = MPOStage(name="rft", steps=STEPS, num_rollouts=2, scenarios_per_step=PER_STEP, lr=1e-3, alpha="auto",
                     sampling=SamplingConfig(top_k=8))
    job = LearnerJob(stage=stage, stage_dir=str(tmp_path / "rft"), init_checkpoint=str(path), datasets=datasets,
                     ref_checkpoint=str(path), rollout_workers=workers, scenes_per_batch=2, run_name="mpo-ranks")
    try:
        out = run_learner(job, RayConfig(num_learners=WORLD, cpus_per_learner=0.5, max_learner_failures=0),
                          str(tmp_path / "ray"))
    finally:
        for w in workers:
            ray.kill(w)
    rows = [json.loads(line) for line in (tmp_path / "rft" / "train_log.jsonl").read_text().splitlines()]
    ranks = [json.loads(line) for line in (tmp_path / "rft" / ROLLOUTS_LOG).read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["progress"] for r in ranks] == list(range(STEPS))
    for row, logged in zip(rows, ranks):
        step = row["step"]
        wanted = step_scenarios(0, step, len(index), PER_STEP)
        by_rank = logged["ranks"]
        assert [r["rank"] for r in by_rank] == list(range(WORLD))
        for r in by_rank:  # each rank gathered exactly its own share, itself
            assert r["scenarios"] == wanted[r["rank"]::WORLD], (step, r)
            assert r["failed"] == 0 and r["stale"] == 0
        # the same weights on both ranks after every update
        assert len({r["weights_sha256"] for r in by_rank}) == 1, (step, by_rank)
        # the logged means are over every rank's scenarios, not rank 0's share
        rewards = [x for r in by_rank for x in r["rewards"]]
        assert row["scenarios"] == PER_STEP and row["scenarios_this_rank"] == PER_STEP // WORLD
        assert row["reward"] == pytest.approx(np.mean(rewards), abs=1e-6)
    # alpha: auto is the first step's mean reward over both ranks' scenarios
    alpha = json.loads((tmp_path / "rft" / "alpha.json").read_text())
    assert alpha["from_scenarios"] == PER_STEP
    assert alpha["alpha"] == pytest.approx(np.mean([x for r in ranks[0]["ranks"] for x in r["rewards"]]), abs=1e-6)
    # the stage's model is the ranks' common weights, and they moved
    final = load_checkpoint(out)
    assert weights_digest(final) == ranks[-1]["ranks"][0]["weights_sha256"]
    assert weights_digest(final) != weights_digest(load_checkpoint(str(path)))
