"""Token selectors: how a closed-loop step turns next-token logits into chosen tokens.

A selector is any object with `needs_candidates: bool` and
`__call__(logits [N, V], candidates [N, V, 3] | None, step: int) -> long [N]`, where N is the
flattened (scene, rollout, agent) axis, `candidates` are the poses each token would reach (only
computed when `needs_candidates`), and `step` is the future token index 0..15.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from smart_r1.tokens.geometry import wrap_angle
from smart_r1.tokens.motion_vocab import NUM_HISTORY_TOKENS
from smart_r1.tokens.scene import SceneBatch


class TokenSelector(Protocol):
    needs_candidates: bool

    def __call__(self, logits: torch.Tensor, candidates: torch.Tensor | None, step: int) -> torch.Tensor: ...


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """Tempered logits [N, V] with everything outside the top-k and the nucleus (top-p) set to -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    x = logits.float() / temperature  # [N, V]
    if 0 < top_k < x.shape[-1]:
        kth = x.topk(top_k, dim=-1).values[:, -1:]  # [N, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)  # [N, V]
        probs = sorted_x.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each
        drop_sorted = before >= top_p  # the most likely token is always kept
        x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    return x


@dataclass
class Sampler:
    """Sample from the tempered, top-k and nucleus-filtered distribution (top_k 0: no top-k)."""

    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    generator: torch.Generator | None = field(default=None, repr=False)
    needs_candidates: bool = False

    def __call__(self, logits: torch.Tensor, candidates: torch.Tensor | None, step: int) -> torch.Tensor:
        probs = filter_logits(logits, self.top_k, self.top_p, self.temperature).softmax(-1)  # [N, V]
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]  # [N]


@dataclass
class Greedy:
    """The most likely token."""

    needs_candidates: bool = False

    def __call__(self, logits: torch.Tensor, candidates: torch.Tensor | None, step: int) -> torch.Tensor:
        return logits.argmax(-1)


@dataclass
class CatKSelector:
    """CAT-K: among the top_k most likely tokens, the one whose reached pose is closest to the log.

    target_pose [N, 16, 3]: logged pose after each future token; target_valid bool [N, 16]. Where the
    log is missing, the most likely token is taken. Distance: position error (m) plus
    `heading_weight` times the heading error (rad)."""

    top_k: int
    target_pose: torch.Tensor
    target_valid: torch.Tensor
    heading_weight: float = 1.0
    needs_candidates: bool = True

    def __call__(self, logits: torch.Tensor, candidates: torch.Tensor | None, step: int) -> torch.Tensor:
        top = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).indices  # [N, K]
        cand = candidates.gather(1, top[..., None].expand(*top.shape, 3))  # [N, K, 3]
        target = self.target_pose[:, step, None, :].to(cand.dtype)  # [N, 1, 3]
        dist = (cand[..., :2] - target[..., :2]).norm(dim=-1) \
            + self.heading_weight * wrap_angle(cand[..., 2] - target[..., 2]).abs()  # [N, K]
        closest = top.gather(1, dist.argmin(-1, keepdim=True))[:, 0]  # [N]
        return torch.where(self.target_valid[:, step], closest, top[:, 0])


def catk_selector(batch: SceneBatch, num_rollouts: int, top_k: int, heading_weight: float = 1.0) -> CatKSelector:
    """A CatKSelector whose targets are `batch`'s logged future anchors, flattened in the closed-loop
    order (scene, rollout, agent)."""
    first = NUM_HISTORY_TOKENS + 1  # anchor reached by the first future token (step 15)
    pose = batch.log_anchor_pose[:, :, first:]  # [B, A, 16, 3]
    valid = batch.anchor_valid[:, :, first:]  # [B, A, 16] (logged anchors are valid where these are)
    b, a = valid.shape[:2]
    pose = pose[:, None].expand(b, num_rollouts, *pose.shape[1:]).reshape(b * num_rollouts * a, -1, 3)  # [N, 16, 3]
    valid = valid[:, None].expand(b, num_rollouts, *valid.shape[1:]).reshape(b * num_rollouts * a, -1)  # [N, 16]
    return CatKSelector(top_k, pose, valid, heading_weight)
