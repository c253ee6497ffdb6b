"""Experience of an RL step: rollouts scored into rewards where they were sampled (the rollout
actor), then collated into one typed batch for the MPO step (the learner).

An `Experience` (smart_r1.types) carries its own scene, so the learner recomputes log-probs
without reading the dataset.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from smart_r1.metrics import rollout_signals
from smart_r1.rl.rewards import RewardConfig, rollout_rewards
from smart_r1.rollout.closed_loop import RolloutTensors, to_rollouts
from smart_r1.tokens.scene import SceneBatch, collate
from smart_r1.types import Experience, ScenarioRecord


def make_experience(scenario_index: int, record: ScenarioRecord, scene: SceneBatch, tensors: RolloutTensors,
                    version: int, reward: RewardConfig, rollout_seconds: float = 0.0) -> Experience:
    """Score the rollouts of one scene (B = 1) with the fast WOSAC signals and assemble rewards.

    Raises FloatingPointError on a non-finite reward: the caller drops the scenario rather than
    scoring it as zero (with a fixed baseline, a zero reward pushes away from whatever was sampled).
    """
    t0 = time.perf_counter()
    (rollout,) = to_rollouts(scene, tensors)
    signals = rollout_signals(record, rollout.states)
    rewards = rollout_rewards(signals.realism.float(), signals.collision, signals.offroad, reward)
    if not torch.isfinite(rewards).all():
        raise FloatingPointError("non-finite reward")
    return Experience(
        scenario_index=scenario_index, scenario_id=record.scenario_id, version=version, scene=scene,
        tokens=tensors.tokens[0].cpu().numpy(), poses=tensors.poses[0].cpu().numpy(),
        log_probs=tensors.log_probs[0].float().cpu().numpy(),
        rewards=rewards.cpu().numpy().astype(np.float32), realism=signals.realism.float().cpu().numpy(),
        collision=signals.collision.cpu().numpy(), offroad=signals.offroad.cpu().numpy(),
        seconds={"rollout": rollout_seconds, "reward": time.perf_counter() - t0})


@dataclass(frozen=True)
class ExperienceBatch:
    """B scenes' rollouts, agent slots padded to A (padding is never a sim agent).

    Fields (dtype, shape):
        scenes: SceneBatch of the B scenes (sim agents)
        tokens: int64 [B, R, A, 16], sampled motion tokens
        poses: float32 [B, R, A, 80, 3], poses the rollouts reached (scene frame)
        old_log_probs: float32 [B, R, A, 16], log pi_old when sampled (the behaviour policy)
        rewards: float32 [B, R] per rollout or [B, R, A] per agent
        versions: int64 [B], the weights version that sampled each scene's rollouts
    """

    scenes: SceneBatch
    tokens: torch.Tensor
    poses: torch.Tensor
    old_log_probs: torch.Tensor
    rewards: torch.Tensor
    versions: torch.Tensor

    @property
    def live(self) -> torch.Tensor:
        """bool [B, R, A, 16]: the tokens that count (sim agents, every step)."""
        b, r, a, t = self.tokens.shape
        return (self.scenes.sim_mask & self.scenes.agent_mask)[:, None, :, None].expand(b, r, a, t)


def _pad_agents(arrays: Sequence[np.ndarray], a: int) -> torch.Tensor:
    """Stack [R, A_i, ...] arrays into [B, R, a, ...], zero-padding the agent axis."""
    out = []
    for x in arrays:
        width = [(0, 0)] * x.ndim
        width[1] = (0, a - x.shape[1])
        out.append(np.pad(x, width))
    return torch.as_tensor(np.stack(out))


def collate_experiences(experiences: Sequence[Experience], device: torch.device | str = "cpu") -> ExperienceBatch:
    """One padded batch of experiences (their scenes collated alike)."""
    if not experiences:
        raise ValueError("no experiences to collate")
    scenes = collate([e.scene for e in experiences]).to(device)
    a = scenes.agent_mask.shape[1]
    per_agent = experiences[0].rewards.ndim == 2
    rewards = (_pad_agents([e.rewards for e in experiences], a) if per_agent
               else torch.as_tensor(np.stack([e.rewards for e in experiences])))
    return ExperienceBatch(
        scenes=scenes,
        tokens=_pad_agents([e.tokens for e in experiences], a).to(device),
        poses=_pad_agents([e.poses for e in experiences], a).to(device),
        old_log_probs=_pad_agents([e.log_probs for e in experiences], a).to(device),
        rewards=rewards.to(device),
        versions=torch.tensor([e.version for e in experiences], dtype=torch.int64, device=device))
