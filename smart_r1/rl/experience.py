"""Experience of an RL step: rollouts scored into rewards where they were sampled (the rollout
actor), then collated into one typed batch for the MPO step (the learner).

An `Experience` (smart_r1.types) carries its own scene, so the learner recomputes log-probs
without reading the dataset.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from smart_r1.config import SamplingConfig
from smart_r1.metrics import rollout_signals
from smart_r1.metrics.signals import progress
from smart_r1.rl.rewards import RewardConfig, rollout_rewards
from smart_r1.rollout.closed_loop import RolloutTensors, to_rollouts, token_log_probs
from smart_r1.tokens.scene import SceneBatch, collate, unpad
from smart_r1.types import Experience, ScenarioRecord


def make_experience(scenario_index: int, record: ScenarioRecord, scene: SceneBatch, tensors: RolloutTensors,
                    version: int, reward: RewardConfig, rollout_seconds: float = 0.0,
                    ref_log_probs: torch.Tensor | None = None, reference_seconds: float = 0.0,
                    numerics: str = "") -> Experience:
    """Score the rollouts of one scene (B = 1) with the fast WOSAC signals and assemble rewards.
    `ref_log_probs` [1, R, A, 16]: the frozen reference's log-probs of the sampled tokens, when the
    worker computed them (`reference_log_probs`); `numerics`: what the worker computed its
    log-probs in (`smart_r1.model.precision.numerics`).

    Raises FloatingPointError on a non-finite reward: the caller drops the scenario rather than
    scoring it as zero (with a fixed baseline, a zero reward pushes away from whatever was sampled).
    """
    t0 = time.perf_counter()
    (rollout,) = to_rollouts(scene, tensors)
    signals = rollout_signals(record, rollout.states)
    kept = (progress(record, rollout.states, both_ways=reward.progress_both_ways)  # [R, S]
            if reward.progress_weight or reward.gate_by_progress else None)
    rewards = rollout_rewards(signals.realism.float(), signals.collision, signals.offroad, reward, kept)
    if not torch.isfinite(rewards).all():
        raise FloatingPointError("non-finite reward")
    return Experience(
        scenario_index=scenario_index, scenario_id=record.scenario_id, version=version, scene=scene,
        tokens=tensors.tokens[0].cpu().numpy(), poses=tensors.poses[0].cpu().numpy(),
        log_probs=tensors.log_probs[0].float().cpu().numpy(),
        rewards=rewards.cpu().numpy().astype(np.float32), realism=signals.realism.float().cpu().numpy(),
        collision=signals.collision.cpu().numpy(), offroad=signals.offroad.cpu().numpy(),
        seconds={"rollout": rollout_seconds, "reward": time.perf_counter() - t0, "reference": reference_seconds},
        ref_log_probs=None if ref_log_probs is None else ref_log_probs[0].float().cpu().numpy(), numerics=numerics)


# Agent-rollouts (B x rollouts x agent slots) of one teacher-forced reference pass: its transient
# activations are ~2 MB each at the `default` preset (bfloat16), so 32 rollouts of a 128-agent WOMD
# scene in one pass held 8 GB; 512 holds ~1 GB (benchmarks/bench_memory.py, BENCHMARKS.md).
REFERENCE_AGENT_ROLLOUTS_PER_PASS = 512


def reference_log_probs(ref_model, scene: SceneBatch, tensors: RolloutTensors, sampling: SamplingConfig,
                        agent_rollouts_per_pass: int = REFERENCE_AGENT_ROLLOUTS_PER_PASS) -> torch.Tensor:
    """log pi_ref [B, R, A, 16] of sampled rollouts under the frozen reference, exactly as the
    learner's `mpo_step` computes them (`token_log_probs`, the sampler's distribution), so a
    rollout worker that holds the reference can send them along. The rollouts go through in
    passes of about `agent_rollouts_per_pass` agent-rollouts (at least one rollout): the same
    numbers, with one pass's memory."""
    b, r, a = tensors.tokens.shape[:3]
    step = max(1, agent_rollouts_per_pass // max(1, b * a))
    with torch.no_grad():
        return torch.cat([token_log_probs(ref_model, scene, tensors.tokens[:, i:i + step], tensors.poses[:, i:i + step],
                                          **dataclasses.asdict(sampling)) for i in range(0, r, step)], 1)


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
        ref_log_probs: float32 [B, R, A, 16] or None, log pi_ref from the rollout workers
    """

    scenes: SceneBatch
    tokens: torch.Tensor
    poses: torch.Tensor
    old_log_probs: torch.Tensor
    rewards: torch.Tensor
    versions: torch.Tensor
    ref_log_probs: torch.Tensor | None = None

    @property
    def live(self) -> torch.Tensor:
        """bool [B, R, A, 16]: the tokens that count (sim agents, every step)."""
        b, r, a, t = self.tokens.shape
        return (self.scenes.sim_mask & self.scenes.agent_mask)[:, None, :, None].expand(b, r, a, t)

    def per_scene(self) -> list["ExperienceBatch"]:
        """One batch per scene (B = 1), cut to its own agents and map segments: no padding."""
        out = []
        for i in range(self.tokens.shape[0]):
            scene = unpad(self.scenes, i)
            a = scene.agent_mask.shape[1]
            cut = lambda x: None if x is None else x[i:i + 1, :, :a]  # [1, R, A_i, ...]
            out.append(ExperienceBatch(
                scenes=scene, tokens=cut(self.tokens), poses=cut(self.poses), old_log_probs=cut(self.old_log_probs),
                rewards=cut(self.rewards) if self.rewards.dim() == 3 else self.rewards[i:i + 1],
                versions=self.versions[i:i + 1], ref_log_probs=cut(self.ref_log_probs)))
        return out


    def rollout_chunks(self, size: int) -> list["ExperienceBatch"]:
        """The batch cut along its rollouts into chunks of at most `size` rollouts (the last may
        be smaller), each with the same scenes: [B, R, ...] -> [B, r, ...]. size 0 (or >= R): the
        batch itself."""
        r = self.tokens.shape[1]
        if size <= 0 or size >= r:
            return [self]
        out = []
        for start in range(0, r, size):
            cut = lambda x: None if x is None else x[:, start:start + size]  # [B, r, ...]
            out.append(dataclasses.replace(
                self, tokens=cut(self.tokens), poses=cut(self.poses), old_log_probs=cut(self.old_log_probs),
                rewards=cut(self.rewards), ref_log_probs=cut(self.ref_log_probs)))
        return out


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
        versions=torch.tensor([e.version for e in experiences], dtype=torch.int64, device=device),
        ref_log_probs=(_pad_agents([e.ref_log_probs for e in experiences], a).to(device)
                       if all(e.ref_log_probs is not None for e in experiences) else None))
