"""Rollouts are reproducible: with `RolloutSpec.seed` a scenario's sampled rollouts (and so its
scores, or its RL experience) depend on the seed and the scenario alone, not on which actor drew it
or what that actor ran before; without a seed each actor keeps its own stream. RL seeds each step
(and a step sampled again) apart: `mpo_loop.step_sampling_seed`."""

from __future__ import annotations

import pytest
import torch

from smart_r1.config import SamplingConfig
from smart_r1.data.dataset import iter_scenarios
from smart_r1.distributed.mpo_loop import step_sampling_seed
from smart_r1.distributed.rollout_worker import RolloutSpec, RolloutWorker
from smart_r1.model.checkpoint import save_checkpoint
from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.tokens.motion_vocab import build_vocab


@pytest.fixture(scope="module")
def checkpoint(sumo_shards, tmp_path_factory) -> bytes:
    vocab = build_vocab(iter_scenarios(sumo_shards), size=16, iters=3)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("eval_seed") / "m.pt"
    save_checkpoint(path, SmartTiny(ModelConfig.preset("test", vocab_size=16), vocab))
    return path.read_bytes()


def _scores(worker: RolloutWorker, indices: list[int], seed) -> dict[str, dict]:
    spec = RolloutSpec(num_rollouts=2, sampling=SamplingConfig(top_k=8), seed=seed)
    out = worker.score_scenarios(-1, [], "heldout", indices, spec)
    assert all(isinstance(r, dict) for r in out), out
    return {r["scenario_id"]: r for r in out}


def test_a_scenario_scores_the_same_on_any_actor_in_any_order(checkpoint, sumo_shards):
    data = {"heldout": str(sumo_shards)}
    first = RolloutWorker(checkpoint, data, seed=0, worker_index=0)
    second = RolloutWorker(checkpoint, data, seed=0, worker_index=1)
    a = _scores(first, [0, 1, 2], seed=5)
    _scores(second, [4], seed=5)  # another history before the same scenarios
    b = _scores(second, [2, 1], seed=5)
    for sid in b:
        assert b[sid] == a[sid], sid
    c = _scores(second, [1], seed=6)  # another evaluation seed draws other rollouts
    (sid,) = c
    assert c[sid] != a[sid]
    # without a seed the draws follow the actor's own stream: the same scenario differs
    d = _scores(first, [1], seed=None)
    e = _scores(second, [1], seed=None)
    assert d[sid] != e[sid]


def _experience(worker: RolloutWorker, indices: list[int], seed: int) -> dict[int, object]:
    spec = RolloutSpec(num_rollouts=2, sampling=SamplingConfig(top_k=8), seed=seed, dataset="heldout")
    out = worker.rollout(-1, [], "heldout", indices, spec)
    return {e.scenario_index: e for e in out}


def test_an_rl_step_samples_alike_on_any_actor(checkpoint, sumo_shards):
    data = {"heldout": str(sumo_shards)}
    first = RolloutWorker(checkpoint, data, seed=0, worker_index=0)
    second = RolloutWorker(checkpoint, data, seed=0, worker_index=1)
    step_seed = step_sampling_seed(3, step=2)
    a = _experience(first, [0, 1], step_seed)
    _experience(second, [3], step_sampling_seed(3, step=1))  # another history before it
    b = _experience(second, [1], step_seed)
    assert (b[1].tokens == a[1].tokens).all() and (b[1].log_probs == a[1].log_probs).all()
    assert (b[1].rewards == a[1].rewards).all()
    # the next step, and the same step sampled again, draw other rollouts
    for other in (step_sampling_seed(3, step=3), step_sampling_seed(3, step=2, attempt=1)):
        assert other != step_seed
        assert not (_experience(second, [1], other)[1].tokens == a[1].tokens).all()
