"""Several scenarios in one closed-loop batch: a scene's rollouts there follow exactly the
distribution they follow alone (padding agent and map slots change nothing), on the real WOMD
scenario and generated SUMO scenes; and a rollout actor that batches a call's scenarios still
fails a bad scenario alone.

Why not the same samples: `torch.multinomial` draws from the generator row by row over the
batch's [B * R * A, V] logits, whose layout (and padding) depends on the other scenes, so the
same seed cannot give a scene the same draws in a batch. Instead each scene is sampled alone,
and its samples are replayed in the batch: at every one of the 16 steps the batch must show each
of the scene's agents the same logits (hence the same sampling distribution) as the scene alone,
and give the same log-probs, poses and reference log-probs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from smart_r1.data.index import scenario_index
from smart_r1.distributed.rollout_worker import RolloutSpec, RolloutWorker
from smart_r1.model.checkpoint import checkpoint_bytes, save_checkpoint
from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.rollout.closed_loop import closed_loop, token_log_probs
from smart_r1.rollout.sampling import Sampler
from smart_r1.tokens.motion_vocab import build_vocab
from smart_r1.tokens.scene import build_scene, collate
from smart_r1.types import Experience, RolloutFailure

TOP_K = 8
ROLLOUTS = 2


@dataclass
class Recorded:
    """A token selector that records the logits [N, V] it is shown at every step and takes its
    tokens from `replay` [N, 16] when given, else from a top-k Sampler."""

    sampler: Sampler
    replay: torch.Tensor | None = None
    logits: list = field(default_factory=list)
    needs_candidates: bool = False

    def __call__(self, logits, candidates, step):
        self.logits.append(logits.clone())
        return self.sampler(logits, candidates, step) if self.replay is None else self.replay[:, step]

    def log_prob(self, logits, chosen):
        return self.sampler.log_prob(logits, chosen)


@pytest.fixture(scope="module")
def records(womd_record, sumo_shards):
    """Two SUMO scenes of different sizes around the real WOMD scene (which pads them)."""
    index = scenario_index(str(sumo_shards))
    return [index.read([0])[0], womd_record, index.read([3])[0]]


@pytest.fixture(scope="module")
def model(records):
    torch.manual_seed(0)
    vocab = build_vocab(records, size=ModelConfig.preset("test").vocab_size, iters=3)
    return SmartTiny(ModelConfig.preset("test"), vocab).eval()


def test_a_scene_in_a_batch_follows_its_own_distribution(model, records):
    # the WOMD scene has the most agents and (cut here) the fewest map segments: every scene is padded
    scenes = [build_scene(r, model.vocab, agents="sim", max_map_segments=96 if i == 1 else 256)
              for i, r in enumerate(records)]
    sizes = [(s.agent_mask.shape[1], s.map_mask.shape[1]) for s in scenes]
    batch = collate(scenes)
    b, a = batch.agent_mask.shape
    m = batch.map_mask.shape[1]
    assert len({n for n, _ in sizes}) == 3 and all(n < a or k < m for n, k in sizes), sizes  # real padding
    alone, replay = [], torch.zeros(b, ROLLOUTS, a, 16, dtype=torch.long)
    for i, scene in enumerate(scenes):
        selector = Recorded(Sampler(top_k=TOP_K, generator=torch.Generator().manual_seed(i)))
        out = closed_loop(model, scene, ROLLOUTS, selector)
        alone.append((out, selector.logits))
        replay[i, :, :sizes[i][0]] = out.tokens[0]
    selector = Recorded(Sampler(top_k=TOP_K), replay=replay.reshape(b * ROLLOUTS * a, 16))
    together = closed_loop(model, batch, ROLLOUTS, selector)
    ref_together = token_log_probs(model, batch, together.tokens, together.poses, top_k=TOP_K)  # [B, R, A, 16]
    for i, (n, _) in enumerate(sizes):
        out, logits = alone[i]
        mine = together.scene(i, n)
        assert torch.equal(mine.tokens, out.tokens)
        for step in range(16):  # the whole next-token distribution of every agent, every step
            seen = selector.logits[step].view(b, ROLLOUTS, a, -1)[i, :, :n]  # [R, n, V]
            torch.testing.assert_close(seen, logits[step].view(ROLLOUTS, n, -1), atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(mine.log_probs, out.log_probs, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(mine.poses, out.poses, atol=1e-4, rtol=1e-5)
        ref_alone = token_log_probs(model, scenes[i], out.tokens, out.poses, top_k=TOP_K)
        torch.testing.assert_close(ref_together[i:i + 1, :, :n], ref_alone, atol=2e-4, rtol=1e-4)
    # and the samples really differ between scenes' rollouts: the comparison saw sampled tokens
    assert (alone[1][0].tokens[0, 0] != alone[1][0].tokens[0, 1]).any()


def test_an_actor_batches_a_calls_scenarios_and_fails_a_bad_one_alone(model, sumo_shards, tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, model)
    worker = RolloutWorker(checkpoint_bytes(path), {"train": str(sumo_shards)})
    spec = RolloutSpec(num_rollouts=2, sampling=dataclasses.replace(RolloutSpec().sampling, top_k=TOP_K),
                       scenes_per_batch=4)
    # 10**6 does not exist (fails at reading); scenario 2's scene is damaged so that simulating it
    # raises (its tokens point past the vocabulary): its batch fails, is simulated again scene by
    # scene, and only scenario 2 is lost
    record = worker.record("train", 2)
    scene = worker._scene("train", 2, record)
    worker._scenes[("train", 2)] = dataclasses.replace(scene, tokens=scene.tokens + 10**6)
    out = worker.rollout(0, [], "train", [0, 10**6, 2, 1, 3, 4], spec)
    assert [type(r) for r in out] == [Experience, RolloutFailure, RolloutFailure, Experience, Experience, Experience]
    assert "IndexError" in out[1].error and out[2].scenario_id == record.scenario_id
    for r, index in zip([out[0], out[3], out[4], out[5]], [0, 1, 3, 4]):
        agents = int(worker.record("train", index).sim_agent_mask.sum())
        assert r.scenario_index == index and r.tokens.shape == (2, agents, 16) and r.poses.shape == (2, agents, 80, 3)
        assert r.scene.agent_mask.shape[1] == agents  # its own scene, not the batch's padding
        assert np.isfinite(r.rewards).all() and r.seconds["rollout"] > 0
    # scoring batches the same way
    scored = worker.score_scenarios(0, [], "train", [0, 1], spec)
    assert [s["scenario_id"] for s in scored] == [worker.record("train", i).scenario_id for i in (0, 1)]
    assert all(0.0 <= s["metametric"] <= 1.0 for s in scored)
