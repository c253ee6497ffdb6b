"""Rewards for MPO from the fast WOSAC metrics of each sampled rollout.

Per-rollout reward (default), for rollout r over its S sim agents, with weights w_c, w_o >= 0:

    R_r = (realism_r + w_c * (1 - mean_a collision_{r,a}) + w_o * (1 - mean_a offroad_{r,a}))
          / (1 + w_c + w_o)

Per-agent credit (option `per_agent_credit`): each agent is charged only for its own events,

    R_{r,a} = (realism_r + w_c * (1 - collision_{r,a}) + w_o * (1 - offroad_{r,a})) / (1 + w_c + w_o)

With a progress weight w_p > 0 each agent is also credited for keeping up with the log,
progress_{r,a} = min(1, its simulated / logged path length) (`smart_r1.metrics.signals.progress`;
with `progress_both_ways`, min(s / l, l / s): travelling further than the log costs as well),
added as `w_p * progress` (per rollout: the mean over agents) and normalised by 1 + w_c + w_o + w_p.
Without it an agent can buy the collision and off-road terms by slowing down. With
`gate_by_progress` the collision- and off-road-free terms are instead earned in proportion to the
distance covered, w_c * (1 - collision) * progress (and off-road alike): an agent that stands still
earns no safety credit, one that keeps the log's pace without incident earns all of it.

`realism_r` is the per-rollout realism score of `smart_r1.metrics.rollout_signals`, the WOSAC
metametric of that rollout alone, in [0, 1]. The reward is a weighted mean of it and of the
fractions of agents free of collision and off-road, so it stays on the metric's [0, 1] scale, where
MPO's fixed baseline alpha lives: alpha should sit near the SFT policy's mean reward (rollouts
better than it are reinforced, worse ones suppressed). With w_c = w_o = 0 the reward is the
realism score alone, as in the paper; the two extra terms sharpen the signal of the safety
metrics that WOSAC also reports as rates (they are 0/1 events, which the metametric's smoothed
likelihoods blur). The per-agent rewards of a rollout average to its per-rollout reward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RewardConfig:
    """The reward's weights (an MPO stage's `collision_weight`, `offroad_weight`, `per_agent_credit`)."""

    collision_weight: float = 1.0
    offroad_weight: float = 1.0
    per_agent_credit: bool = False
    progress_weight: float = 0.0
    gate_by_progress: bool = False
    progress_both_ways: bool = False  # progress also charges travelling further than the log

    @classmethod
    def of_stage(cls, stage) -> "RewardConfig":
        return cls(stage.collision_weight, stage.offroad_weight, stage.per_agent_credit, stage.progress_weight,
                   stage.gate_by_progress, stage.progress_both_ways)


def rollout_rewards(realism: torch.Tensor, collision: torch.Tensor, offroad: torch.Tensor,
                    cfg: RewardConfig = RewardConfig(), progress: torch.Tensor | None = None) -> torch.Tensor:
    """Rewards in [0, 1], [R] per rollout or [R, S] per agent.

    Args:
        realism: [R] per-rollout realism score.
        collision, offroad: [R, S] bool, whether each agent collided / left the road.
        progress: [R, S] in [0, 1], each agent's share of its logged distance (needed when
            cfg.progress_weight > 0 or cfg.gate_by_progress).
    """
    w_c, w_o, w_p = cfg.collision_weight, cfg.offroad_weight, cfg.progress_weight
    free_col = 1.0 - collision.to(realism.dtype)  # [R, S]
    free_off = 1.0 - offroad.to(realism.dtype)
    if (w_p or cfg.gate_by_progress) and progress is None:
        raise ValueError("a progress weight or gate needs each agent's progress")
    kept = progress.to(realism.dtype) if progress is not None else torch.zeros_like(free_col)  # [R, S]
    if cfg.gate_by_progress:  # safety credit only for the distance covered
        free_col, free_off = free_col * kept, free_off * kept
    norm = 1.0 + w_c + w_o + w_p
    if cfg.per_agent_credit:
        return (realism[:, None] + w_c * free_col + w_o * free_off + w_p * kept) / norm
    if free_col.shape[1] == 0:  # no agents: nothing to charge
        return realism
    return (realism + w_c * free_col.mean(1) + w_o * free_off.mean(1) + w_p * kept.mean(1)) / norm
