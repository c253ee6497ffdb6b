from __future__ import annotations

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
