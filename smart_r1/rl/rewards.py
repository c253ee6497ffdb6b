"""Rewards for MPO from the fast WOSAC metrics of each sampled rollout.

Per-rollout reward (default), for rollout r over its S sim agents:

    R_r = realism_r - c_col * mean_a collision_{r,a} - c_off * mean_a offroad_{r,a}

Per-agent credit (option `per_agent_credit`): each agent is charged only for its own events,

    R_{r,a} = realism_r - c_col * collision_{r,a} - c_off * offroad_{r,a}

`realism_r` is the per-rollout realism score of `smart_r1.metrics.rollout_signals` (on the
metametric's [0, 1] scale, which is why a fixed baseline alpha near the model's metametric works).
The explicit penalties sharpen the signal of the two safety metrics that WOSAC also reports as
rates; they are 0/1 events, so c = 1 makes one colliding agent in S cost 1/S of the reward.
"""

from __future__ import annotations

import torch


def rollout_rewards(realism: torch.Tensor, collision: torch.Tensor, offroad: torch.Tensor,
                    collision_penalty: float, offroad_penalty: float,
                    per_agent: bool = False) -> torch.Tensor:
    """Rewards, [R] per rollout or [R, S] per agent.

    Args:
        realism: [R] per-rollout realism score.
        collision, offroad: [R, S] bool, whether each agent collided / left the road.
    """
    col, off = collision.to(realism.dtype), offroad.to(realism.dtype)
    if per_agent:
        return realism[:, None] - collision_penalty * col - offroad_penalty * off
    if col.shape[1] == 0:
        return realism.clone()
    return realism - collision_penalty * col.mean(1) - offroad_penalty * off.mean(1)
