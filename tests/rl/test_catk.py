"""CAT-K closed-loop SFT: targets lead back to the log, the loss trains every parameter."""

from __future__ import annotations

import pytest
import torch

from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.rl.catk import catk_sft_loss, catk_targets
from smart_r1.rollout.closed_loop import closed_loop
from smart_r1.rollout.sampling import Sampler, catk_selector
from smart_r1.tokens.geometry import compose
from smart_r1.tokens.motion_vocab import SHIFT, build_vocab
from smart_r1.tokens.scene import build_scene


@pytest.fixture(scope="module")
def setup(womd_record):
    torch.manual_seed(0)
    vocab = build_vocab([womd_record], size=64, seed=0)
    model = SmartTiny(ModelConfig.preset("test"), vocab)
    batch = build_scene(womd_record, vocab, agents="sim")
    return model, batch


def _error_to_log(batch, rollout, vocab, targets=None):
    """Mean distance from the pose each step reaches to the logged pose, per step."""
    log = batch.log_anchor_pose[:, None, :, 3:, :2]  # [B, 1, A, 16, 2]
    reached = rollout.poses[:, :, :, SHIFT - 1::SHIFT, :2]  # [B, R, A, 16, 2]
    valid = batch.anchor_valid[:, None, :, 3:]
    return (reached - log).norm(dim=-1)[valid.expand(reached.shape[:-1])].mean()


def test_catk_rollouts_stay_closer_to_log_than_sampling(setup):
    model, batch = setup
    torch.manual_seed(1)
    sampled = closed_loop(model, batch, 2, Sampler())
    catk = closed_loop(model, batch, 2, catk_selector(batch, 2, top_k=8))
    assert _error_to_log(batch, catk, model.vocab) < _error_to_log(batch, sampled, model.vocab)


def test_targets_point_back_to_the_log(setup):
    model, batch = setup
    rollout = closed_loop(model, batch, 2, Sampler())
    targets, valid = catk_targets(batch, rollout, model.vocab)
    assert targets.shape == rollout.tokens.shape and valid.any()
    # From each visited state, the target's end pose is at least as close to the log as the
    # executed token's: it is the best of the whole vocabulary.
    reached = rollout.poses[:, :, :, SHIFT - 1::SHIFT]
    start = torch.cat([batch.anchor_pose[:, None, :, 2:3].expand(-1, 2, -1, -1, -1), reached[:, :, :, :-1]], 3)
    ends = model.vocab.end_poses[batch.agent_type][:, None, :, None]  # [B, 1, A, 1, V, 3]
    def end_of(tok):
        idx = tok[..., None, None].expand(*tok.shape, 1, 3)
        return compose(start, ends.expand(*start.shape[:4], -1, 3).gather(4, idx)[..., 0, :])
    log = batch.log_anchor_pose[:, None, :, 3:, :2]
    d_target = (end_of(targets)[..., :2] - log).norm(dim=-1)[valid]
    d_exec = (end_of(rollout.tokens)[..., :2] - log).norm(dim=-1)[valid]
    assert (d_target <= d_exec + 1e-4).float().mean() > 0.95
    assert d_target.mean() < d_exec.mean()


def test_loss_trains_every_parameter_and_decreases(setup):
    model, batch = setup
    torch.manual_seed(2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(6):
        optimizer.zero_grad()
        loss, stats = catk_sft_loss(model, batch, top_k=5)
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert not missing, f"parameters without gradient: {missing}"
            assert stats["tokens"] > 0
        optimizer.step()
        losses.append(stats["loss"])
    assert losses[-1] < losses[0]
