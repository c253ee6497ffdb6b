from __future__ import annotations

import torch

from smart_r1.rl.rewards import rollout_rewards


def test_rewards_penalise_events():
    realism = torch.tensor([0.8, 0.8])
    collision = torch.tensor([[True, False, False, False], [False, False, False, False]])
    offroad = torch.tensor([[False, False, False, False], [True, True, False, False]])
    r = rollout_rewards(realism, collision, offroad, 1.0, 0.5)
    assert torch.allclose(r, torch.tensor([0.8 - 0.25, 0.8 - 0.25]))
    per_agent = rollout_rewards(realism, collision, offroad, 1.0, 0.5, per_agent=True)
    assert per_agent.shape == (2, 4)
    assert torch.allclose(per_agent[0], torch.tensor([-0.2, 0.8, 0.8, 0.8]))
    assert torch.allclose(per_agent[1], torch.tensor([0.3, 0.3, 0.8, 0.8]))
    # the per-agent rewards average to the per-rollout ones
    assert torch.allclose(per_agent.mean(1), r)
