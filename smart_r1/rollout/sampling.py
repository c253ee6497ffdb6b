"""Token selectors: how a closed-loop step turns next-token logits into chosen tokens.

A selector is any object with `needs_candidates: bool`,
`__call__(logits [N, V], candidates: Candidates | None, step: int) -> long [N]`, where N is the
flattened (scene, rollout, agent) axis, `candidates` says where each token would take each agent
(only given when `needs_candidates`), and `step` is the future token index 0..15; and
`log_prob(logits [N, V], chosen [N]) -> [N]`, the log-probability of the chosen tokens under the
distribution it draws from (policy gradients need the sampler's own distribution).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from smart_r1.tokens.geometry import compose
from smart_r1.tokens.motion_vocab import NUM_HISTORY_TOKENS, SHIFT
from smart_r1.tokens.scene import SceneBatch
from smart_r1.tokens.tokenize import token_distance


@dataclass(frozen=True)
class Candidates:
    """Where the tokens would take the agents this step: start [N, 3] (x, y, heading) now,
    contours [N, V, SHIFT, 3] every token's poses relative to the start, type_idx long [N]."""

    start: torch.Tensor
    contours: torch.Tensor
    type_idx: torch.Tensor

    def placed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Poses [N, K, SHIFT, 3] that tokens [N, K] would visit."""
        idx = tokens[:, :, None, None].expand(*tokens.shape, SHIFT, 3)  # [N, K, SHIFT, 3]
        return compose(self.start[:, None, None, :], self.contours.gather(1, idx))


class TokenSelector(Protocol):
    needs_candidates: bool

    def __call__(self, logits: torch.Tensor, candidates: Candidates | None, step: int) -> torch.Tensor: ...

    def log_prob(self, logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor: ...


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


def sampled_log_probs(logits: torch.Tensor, chosen: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
                      temperature: float = 1.0) -> torch.Tensor:
    """log q(chosen) [...] under the sampler's distribution q (tempered, top-k / nucleus filtered),
    differentiable in the logits. logits [..., V], chosen long [...].

    The chosen token always stays in q's support: a learner whose weights moved since sampling may
    no longer rank it among its top k, and its probability must stay finite."""
    flat = logits.reshape(-1, logits.shape[-1])  # [M, V]
    pick = chosen.reshape(-1, 1)  # [M, 1]
    x = filter_logits(flat, top_k, top_p, temperature)  # [M, V]
    x = x.scatter(1, pick, flat.float().gather(1, pick) / temperature)
    return x.log_softmax(-1).gather(1, pick).view(chosen.shape)


def model_log_probs(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """log p(chosen) [N] under the model itself (temperature 1, whole vocabulary)."""
    return logits.float().log_softmax(-1).gather(1, chosen[:, None])[:, 0]


@dataclass
class Sampler:
    """Sample from the tempered, top-k and nucleus-filtered distribution (top_k 0: no top-k)."""

    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    generator: torch.Generator | None = field(default=None, repr=False)
    needs_candidates: bool = False

    def __call__(self, logits: torch.Tensor, candidates: Candidates | None, step: int) -> torch.Tensor:
        probs = filter_logits(logits, self.top_k, self.top_p, self.temperature).softmax(-1)  # [N, V]
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]  # [N]

    def log_prob(self, logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        return sampled_log_probs(logits, chosen, self.top_k, self.top_p, self.temperature)


@dataclass
class Greedy:
    """The most likely token."""

    needs_candidates: bool = False

    def __call__(self, logits: torch.Tensor, candidates: Candidates | None, step: int) -> torch.Tensor:
        return logits.argmax(-1)

    def log_prob(self, logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        return model_log_probs(logits, chosen)


@dataclass
class CatKSelector:
    """CAT-K: among the K most likely tokens, the one that best follows the log over the
    coming 0.5 s, by the tokenizer's own distance (`token_distance`). With the criterion of the
    tokenizer and of the SFT targets, the executed token is the target whenever the target is
    among the top K (a different criterion lets heading errors build up that the targets then
    keep correcting: measured, see the module docstring of smart_r1.rl.catk).

    target_pose [N, 16, SHIFT, 3]: logged poses of each future interval; target_valid bool
    [N, 16, SHIFT]. Where an interval has no logged pose, the most likely token is taken."""

    catk_k: int
    target_pose: torch.Tensor
    target_valid: torch.Tensor
    needs_candidates: bool = True

    def __call__(self, logits: torch.Tensor, candidates: Candidates | None, step: int) -> torch.Tensor:
        top = logits.topk(min(self.catk_k, logits.shape[-1]), dim=-1).indices  # [N, K]
        placed = candidates.placed(top)  # [N, K, SHIFT, 3]
        valid = self.target_valid[:, step]  # [N, SHIFT]
        dist = token_distance(placed, self.target_pose[:, step].to(placed.dtype), valid,
                              candidates.type_idx)  # [N, K]
        closest = top.gather(1, dist.argmin(-1, keepdim=True))[:, 0]  # [N]
        return torch.where(valid.any(-1), closest, top[:, 0])

    def log_prob(self, logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        return model_log_probs(logits, chosen)


def catk_selector(batch: SceneBatch, num_rollouts: int, catk_k: int) -> CatKSelector:
    """A CatKSelector whose targets are `batch`'s logged future poses, flattened in the
    closed-loop order (scene, rollout, agent)."""
    first = (NUM_HISTORY_TOKENS * SHIFT) + 1  # first future step (11)
    pose = batch.log_pose[:, :, first:]  # [B, A, 80, 3]
    valid = batch.log_valid[:, :, first:]  # [B, A, 80]
    b, a = valid.shape[:2]
    pose = pose[:, None].expand(b, num_rollouts, *pose.shape[1:]).reshape(b * num_rollouts * a, -1, SHIFT, 3)
    valid = valid[:, None].expand(b, num_rollouts, *valid.shape[1:]).reshape(b * num_rollouts * a, -1, SHIFT)
    return CatKSelector(catk_k, pose, valid)  # [N, 16, SHIFT, 3], [N, 16, SHIFT]
