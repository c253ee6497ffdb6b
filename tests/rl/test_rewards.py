from __future__ import annotations

import numpy as np
import torch

from smart_r1.rl.rewards import RewardConfig, rollout_rewards


def test_rewards_penalise_events_on_the_metric_scale():
    realism = torch.tensor([0.8, 0.8, 0.8])
    collision = torch.tensor([[True, False, False, False], [False] * 4, [True] * 4])
    offroad = torch.tensor([[False] * 4, [True, True, False, False], [True] * 4])
    r = rollout_rewards(realism, collision, offroad, RewardConfig(1.0, 0.5))
    assert torch.allclose(r, torch.tensor([(0.8 + 0.75 + 0.5) / 2.5, (0.8 + 1.0 + 0.25) / 2.5, 0.8 / 2.5]))
    assert ((r >= 0) & (r <= 1)).all()
    clean = rollout_rewards(realism, torch.zeros(3, 4, dtype=torch.bool), torch.zeros(3, 4, dtype=torch.bool), RewardConfig(1.0, 0.5))
    assert (clean > r).all()  # any collision or off-road lowers the reward
    per_agent = rollout_rewards(realism, collision, offroad, RewardConfig(1.0, 0.5, per_agent_credit=True))
    assert per_agent.shape == (3, 4)
    assert torch.allclose(per_agent[0], torch.tensor([1.3, 2.3, 2.3, 2.3]) / 2.5)
    assert torch.allclose(per_agent[1], torch.tensor([1.8, 1.8, 2.3, 2.3]) / 2.5)
    # the per-agent rewards average to the per-rollout ones
    assert torch.allclose(per_agent.mean(1), r)


def test_zero_weights_give_the_realism_score_alone():
    realism = torch.tensor([0.3, 0.7])
    events = torch.tensor([[True, False], [False, True]])
    assert torch.allclose(rollout_rewards(realism, events, events, RewardConfig(0.0, 0.0)), realism)
    assert torch.allclose(rollout_rewards(realism, torch.zeros(2, 0, dtype=torch.bool),
                                          torch.zeros(2, 0, dtype=torch.bool), RewardConfig(1.0, 1.0)), realism)


def test_progress_term_rewards_keeping_up_with_the_log(womd_record):
    """An agent that stops short of its logged distance earns less; the log's own pace earns the
    full term; per-agent progress averages to the per-rollout reward."""
    from smart_r1.metrics import log_replay_states
    from smart_r1.metrics.signals import progress

    states = log_replay_states(womd_record, 2)
    now = states[..., :1, :2]
    states[1, ..., :2] = now[1] + 0.5 * (states[1, ..., :2] - now[1])  # rollout 1: every agent at half pace
    kept = progress(womd_record, states)  # [R, S]
    moving = kept[1] < 0.99
    assert torch.allclose(kept[0], torch.ones_like(kept[0]), atol=1e-6) and moving.any()
    # about half (the first step, from the logged current position, is not slowed)
    assert ((kept[1][moving] > 0.45) & (kept[1][moving] < 0.8)).all() and abs(kept[1][moving].median() - 0.5) < 0.05
    realism = torch.tensor([0.6, 0.6])
    none = torch.zeros_like(kept, dtype=torch.bool)
    cfg = RewardConfig(1.0, 1.0, per_agent_credit=True, progress_weight=1.0)
    per_agent = rollout_rewards(realism, none, none, cfg, kept)
    assert torch.allclose(per_agent[0], torch.full_like(per_agent[0], 3.6 / 4))
    assert (per_agent[1][moving] < per_agent[0][moving]).all()
    per_rollout = rollout_rewards(realism, none, none, RewardConfig(1.0, 1.0, progress_weight=1.0), kept)
    assert torch.allclose(per_agent.mean(1), per_rollout)


def test_progress_both_ways_charges_going_too_far_as_much_as_falling_short(womd_record):
    """Two-sided progress: the log's pace scores 1, twice the log's distance about what half of it
    scores, a parked agent driven away is charged, one left parked is not; one-sided progress pays
    the fast rollout in full."""
    from smart_r1.metrics import log_replay_states
    from smart_r1.metrics.signals import path_lengths, progress

    states = log_replay_states(womd_record, 3)
    now = states[..., :1, :2]
    states[1, ..., :2] = now[1] + 0.5 * (states[1, ..., :2] - now[1])  # half pace
    states[2, ..., :2] = now[2] + 2.0 * (states[2, ..., :2] - now[2])  # double pace
    both = progress(womd_record, states, both_ways=True)  # [R, S]
    one = progress(womd_record, states)
    _, log = path_lengths(womd_record, states)
    moving = log > 10.0  # the first step (from the logged position) hardly changes their lengths
    assert moving.any() and (~moving).any()
    assert torch.allclose(both[0], torch.ones_like(both[0]), atol=1e-6)
    assert torch.allclose(one[2], torch.ones_like(one[2]), atol=1e-6)  # one-sided: too far is free
    assert ((both[2][moving] - 0.5).abs() < 0.08).all() and ((both[1][moving] - 0.5).abs() < 0.08).all()
    c = womd_record.current_time_index
    seen = torch.as_tensor(womd_record.valid[womd_record.sim_agent_mask][:, c:].all(-1))  # logged throughout
    parked = (log < 0.5) & seen
    assert parked.any()
    driven = states.copy()
    driven[:, parked.numpy(), :, 0] += np.linspace(0.0, 20.0, states.shape[2])  # driven 20 m away
    assert (progress(womd_record, driven, both_ways=True)[:, parked] < 0.1).all()
    assert (progress(womd_record, driven)[:, parked] == 1.0).all()
    assert (both[:, parked] == 1.0).all()  # parked and left parked: nothing to charge


def test_gated_safety_credit_is_earned_by_moving():
    """With the gate, standing still earns no collision- or off-road-free credit, keeping the log's
    pace without incident earns all of it, a collision while moving costs its share."""
    realism = torch.tensor([0.6, 0.6, 0.6])
    collision = torch.tensor([[False], [False], [True]])
    none = torch.zeros(3, 1, dtype=torch.bool)
    kept = torch.tensor([[0.0], [1.0], [1.0]])  # stopped, at the log's pace, at pace but colliding
    cfg = RewardConfig(1.0, 1.0, per_agent_credit=True, gate_by_progress=True)
    r = rollout_rewards(realism, collision, none, cfg, kept)[:, 0]
    assert torch.allclose(r, torch.tensor([0.6 / 3, 2.6 / 3, 1.6 / 3]))
    assert r[0] < r[2] < r[1]  # stopping is worse than moving with a collision
