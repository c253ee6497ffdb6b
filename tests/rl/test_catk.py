"""CAT-K closed-loop SFT: targets lead back to the log, the loss trains every parameter."""

from __future__ import annotations

import pytest
import torch

from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import SmartTiny, teacher_targets
from smart_r1.rl.bc import bc_loss
from smart_r1.rl.catk import catk_sft_loss, catk_targets
from smart_r1.rollout.closed_loop import RolloutTensors, closed_loop
from smart_r1.rollout.sampling import Sampler, catk_selector
from smart_r1.tokens.geometry import compose
from smart_r1.tokens.motion_vocab import SHIFT, build_vocab
from smart_r1.tokens.scene import build_scene
from smart_r1.tokens.tokenize import decode, token_distance


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
    catk = closed_loop(model, batch, 2, catk_selector(batch, 2, catk_k=8))
    assert _error_to_log(batch, catk, model.vocab) < _error_to_log(batch, sampled, model.vocab)


def _rollout_along(batch, tokens, vocab) -> RolloutTensors:
    """The rollout that executes `tokens` [B, R, A, 16] from the current reconstructed pose."""
    b, r, a = tokens.shape[:3]
    now = batch.anchor_pose[:, None, :, 2].expand(b, r, a, 3)
    types = batch.agent_type[:, None].expand(b, r, a)
    poses = decode(now, tokens, types, vocab)  # [B, R, A, 80, 3]
    return RolloutTensors(tokens, torch.zeros(tokens.shape), poses)


def test_targets_on_the_log_are_the_bc_tokens(setup):
    model, batch = setup
    logged = batch.tokens[:, None, :, 2:]  # [B, 1, A, 16]: the future tokens of the log
    targets, valid = catk_targets(batch, _rollout_along(batch, logged, model.vocab), model.vocab)
    # where every logged token so far is valid, the executed poses are the tokenizer's own
    # reconstruction (after a gap the tokenizer restarts from the log, the rollout does not)
    unbroken = batch.token_valid[:, None, :, 2:].long().cumprod(-1).bool()
    both = valid & unbroken
    assert both.sum() > 50
    assert torch.equal(targets[both], logged[both])  # no drift: CAT-K adds nothing to BC


def test_catk_over_the_whole_vocabulary_replays_the_tokenizer(setup):
    model, batch = setup
    # With K = V the selector's criterion is the tokenizer's: from the current reconstructed pose
    # it executes the logged token, so the rollout is the tokenizer's reconstruction ...
    rollout = closed_loop(model, batch, 1, catk_selector(batch, 1, catk_k=model.vocab.size))
    logged = batch.tokens[:, None, :, 2:]  # [B, 1, A, 16]
    unbroken = batch.token_valid[:, None, :, 2:].long().cumprod(-1).bool() & batch.sim_mask[:, None, :, None]
    assert unbroken.sum() > 50
    assert torch.equal(rollout.tokens[unbroken], logged[unbroken])
    # ... and every executed token is its own SFT target (no correction left to learn)
    targets, valid = catk_targets(batch, rollout, model.vocab)
    assert torch.equal(targets[valid], rollout.tokens[valid])


def test_targets_point_back_to_the_log(setup):
    model, batch = setup
    torch.manual_seed(3)
    rollout = closed_loop(model, batch, 2, Sampler())
    targets, valid = catk_targets(batch, rollout, model.vocab)
    assert targets.shape == rollout.tokens.shape and valid.any()
    # From each visited state, the target follows the logged interval at least as well as the
    # executed token (it is the best of the whole vocabulary by the tokenizer's distance).
    reached = rollout.poses[:, :, :, SHIFT - 1::SHIFT]
    start = torch.cat([batch.anchor_pose[:, None, :, 2:3].expand(-1, 2, -1, -1, -1), reached[:, :, :, :-1]], 3)
    types = batch.agent_type[:, None].expand(targets.shape[:3])
    contours = model.vocab.contours[types]  # [B, R, A, V, SHIFT, 3]

    def distance(tok, t):
        idx = tok[..., t, None, None, None].expand(*tok.shape[:3], 1, SHIFT, 3)
        placed = compose(start[:, :, :, t, None, None], contours.gather(3, idx))[:, :, :, 0]  # [B, R, A, SHIFT, 3]
        steps = slice((2 + t) * SHIFT + 1, (3 + t) * SHIFT + 1)
        log = batch.log_pose[:, None, :, steps].expand_as(placed)
        ok = batch.log_valid[:, None, :, steps].expand(placed.shape[:-1])
        n = targets.shape[0] * targets.shape[1] * targets.shape[2]
        return token_distance(placed.reshape(n, 1, SHIFT, 3), log.reshape(n, SHIFT, 3), ok.reshape(n, SHIFT),
                              types.reshape(n))[:, 0].view(targets.shape[:3])

    d_target = torch.stack([distance(targets, t) for t in range(16)], -1)[valid]
    d_exec = torch.stack([distance(rollout.tokens, t) for t in range(16)], -1)[valid]
    assert (d_target <= d_exec + 1e-4).all()
    assert d_target.mean() < d_exec.mean()


def test_loss_trains_every_parameter_and_decreases(setup):
    model, batch = setup
    torch.manual_seed(2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(6):
        optimizer.zero_grad()
        loss, stats = catk_sft_loss(model, batch, catk_k=5)
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert not missing, f"parameters without gradient: {missing}"
            assert stats["tokens"] > 0
        optimizer.step()
        losses.append(stats["loss"])
    assert losses[-1] < losses[0]


def test_log_term_and_label_smoothing_are_the_stated_sums(womd_record):
    """L = L_SFT + w * L_BC, and smoothing eps mixes the target's NLL with the mean NLL over the
    vocabulary; dropout off so the pieces are the same forward passes."""
    torch.manual_seed(0)
    vocab = build_vocab([womd_record], size=64, seed=0)
    model = SmartTiny(ModelConfig.preset("test", dropout=0.0), vocab)
    batch = build_scene(womd_record, vocab, agents="sim")
    plain, stats = catk_sft_loss(model, batch, catk_k=5)
    mixed, mixed_stats = catk_sft_loss(model, batch, catk_k=5, bc_weight=0.5)
    log_loss, _ = bc_loss(model, batch)
    assert stats["tokens"] > 0 and "log_loss" in mixed_stats
    assert float(mixed) == pytest.approx(float(plain) + 0.5 * float(log_loss), rel=1e-5)
    smooth, _ = catk_sft_loss(model, batch, catk_k=5, label_smoothing=0.1)
    assert float(smooth) != pytest.approx(float(plain), rel=1e-4)  # the term is really there
    smooth_bc, _ = bc_loss(model, batch, label_smoothing=0.1)
    with torch.no_grad():
        logits = model(batch)
    target, mask = teacher_targets(batch)
    logp = logits[mask].float().log_softmax(-1)
    manual = 0.9 * -logp.gather(-1, target[mask][:, None]).mean() - 0.1 * logp.mean()
    assert float(smooth_bc) == pytest.approx(float(manual), rel=1e-5)


def test_anchor_term_is_zero_at_the_anchor_and_pulls_back_to_it(womd_record):
    """The anchor term is KL(pi_anchor || pi_theta) on the visited states: 0 (and the loss
    unchanged) when the policy is the anchor; positive once the weights move, and its gradient
    moves them back (one SGD step on the KL alone lowers it)."""
    import copy

    torch.manual_seed(0)
    vocab = build_vocab([womd_record], size=64, seed=0)
    model = SmartTiny(ModelConfig.preset("test", dropout=0.0), vocab)
    batch = build_scene(womd_record, vocab, agents="sim")
    anchor = copy.deepcopy(model)
    plain, _ = catk_sft_loss(model, batch, catk_k=5)
    anchored, stats = catk_sft_loss(model, batch, catk_k=5, anchor=anchor, anchor_weight=2.0)
    assert stats["anchor_kl"] == pytest.approx(0.0, abs=1e-5)
    assert float(anchored) == pytest.approx(float(plain), rel=1e-5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    plain, _ = catk_sft_loss(model, batch, catk_k=5)
    anchored, stats = catk_sft_loss(model, batch, catk_k=5, anchor=anchor, anchor_weight=2.0)
    assert stats["anchor_kl"] > 1e-3
    assert float(anchored) == pytest.approx(float(plain) + 2.0 * stats["anchor_kl"], rel=1e-4)
    # the CAT-K rollout is greedy-within-top-K, so the same weights revisit the same states
    _, before = catk_sft_loss(model, batch, catk_k=5, anchor=anchor, anchor_weight=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt.zero_grad()
    kl_only, _ = catk_sft_loss(model, batch, catk_k=5, anchor=anchor, anchor_weight=1.0)
    (kl_only - catk_sft_loss(model, batch, catk_k=5)[0]).backward()
    opt.step()
    _, after = catk_sft_loss(model, batch, catk_k=5, anchor=anchor, anchor_weight=1.0)
    assert after["anchor_kl"] < before["anchor_kl"]
