"""Logged trajectories <-> motion tokens.

Tokenising walks the 18 half-second intervals of a scenario. At each interval every agent's
candidate next contours are the vocabulary's contours placed at its *reconstructed* previous pose;
the chosen token is the candidate closest to the logged poses, and its end pose becomes the next
reconstructed pose. Errors therefore never accumulate: each token corrects the drift of the last.

With `noise_top_k` > 1 (SMART's noisy tokenization, a BC augmentation against drift) every token
after the first is drawn uniformly among the `noise_top_k` closest candidates instead of the
closest: the reconstructed trajectory wanders a little off the log, and the next tokens are the
ones that steer it back, so teacher forcing sees slightly drifted histories and their corrections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smart_r1.tokens.geometry import compose, wrap_angle
from smart_r1.tokens.motion_vocab import NOMINAL_SIZE, NUM_ANCHORS, NUM_TOKENS, SHIFT, MotionVocab

# Heading error is weighted by a quarter of the type's nominal length: the mean displacement of
# the box corners a small rotation causes.
_HEADING_WEIGHT = torch.as_tensor(NOMINAL_SIZE[:, 0] / 4)


@dataclass(frozen=True)
class AgentTokens:
    """Tokens of A agents over one scenario (all tensors on the vocabulary's device).

    tokens: long [A, 18], token i moves from anchor i (step 5 i) to anchor i + 1
    token_valid: bool [A, 18], both anchors of the interval are valid
    anchor_pose: float32 [A, 19, 3], reconstructed (x, y, heading) at steps 0, 5, ..., 90; the
        logged pose where the agent enters; meaningful where anchor_valid
    anchor_valid: bool [A, 19]
    """

    tokens: torch.Tensor
    token_valid: torch.Tensor
    anchor_pose: torch.Tensor
    anchor_valid: torch.Tensor


def token_distance(candidates: torch.Tensor, target: torch.Tensor, target_valid: torch.Tensor,
                   type_idx: torch.Tensor) -> torch.Tensor:
    """Mean pose distance over an interval's valid steps.

    candidates [A, V, SHIFT, 3], target [A, SHIFT, 3], target_valid bool [A, SHIFT], type_idx [A]
    -> [A, V] metres (position error plus heading error times a quarter of the nominal length)."""
    pos_err = (candidates[..., :2] - target[:, None, :, :2]).norm(dim=-1)  # [A, V, SHIFT]
    head_err = wrap_angle(candidates[..., 2] - target[:, None, :, 2]).abs()  # [A, V, SHIFT]
    weight = _HEADING_WEIGHT.to(candidates.device)[type_idx][:, None, None]  # [A, 1, 1]
    err = pos_err + weight * head_err  # [A, V, SHIFT]
    w = target_valid[:, None, :].float()  # [A, 1, SHIFT]
    return (err * w).sum(-1) / w.sum(-1).clamp(min=1)  # [A, V]


def best_tokens(start: torch.Tensor, contours: torch.Tensor, target: torch.Tensor, target_valid: torch.Tensor,
                type_idx: torch.Tensor, top_k: int = 1,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The token whose contour, placed at `start`, best follows the logged poses of the next
    interval (the tokenizer's criterion, `token_distance`), and the pose it ends at; with
    `top_k` > 1 one of the `top_k` best, drawn uniformly with `generator`.

    start [N, 3], contours [N, V, SHIFT, 3], target [N, SHIFT, 3], target_valid bool [N, SHIFT],
    type_idx [N] -> tokens long [N], end poses [N, 3]."""
    candidates = compose(start[:, None, None, :], contours)  # [N, V, SHIFT, 3]
    distance = token_distance(candidates, target, target_valid, type_idx)  # [N, V]
    if top_k > 1:
        closest = distance.topk(min(top_k, distance.shape[1]), dim=-1, largest=False).indices  # [N, k]
        pick = torch.randint(closest.shape[1], (closest.shape[0], 1), generator=generator,
                             device=generator.device if generator is not None else "cpu").to(closest.device)
        best = closest.gather(1, pick)[:, 0]  # [N]
    else:
        best = distance.argmin(-1)  # [N]
    return best, candidates[torch.arange(start.shape[0], device=start.device), best, -1]


@torch.no_grad()
def tokenize(pose: torch.Tensor, valid: torch.Tensor, type_idx: torch.Tensor, vocab: MotionVocab,
             noise_top_k: int = 1, generator: torch.Generator | None = None) -> AgentTokens:
    """Tokens of logged trajectories. pose float [A, 91, 3] (x, y, heading), valid bool [A, 91],
    type_idx long [A] (0 vehicle, 1 pedestrian, 2 cyclist). `noise_top_k` > 1: every token after
    the first is drawn among the `noise_top_k` closest (module docstring)."""
    pose = pose.float()
    contours = vocab.contours.to(pose.device)[type_idx]  # [A, V, SHIFT, 3]
    anchors = pose[:, ::SHIFT]  # [A, 19, 3]
    anchor_valid = valid[:, ::SHIFT].clone()  # [A, 19]
    recon = anchors.clone()
    tokens = torch.zeros(pose.shape[0], NUM_TOKENS, dtype=torch.long, device=pose.device)
    token_valid = anchor_valid[:, :-1] & anchor_valid[:, 1:]  # [A, 18]
    for i in range(NUM_TOKENS):  # sequential by nature: each token starts where the last one ended
        steps = slice(i * SHIFT + 1, (i + 1) * SHIFT + 1)
        tokens[:, i], reached = best_tokens(recon[:, i], contours, pose[:, steps], valid[:, steps], type_idx,
                                            noise_top_k if i > 0 else 1, generator)
        recon[:, i + 1] = torch.where(token_valid[:, i, None], reached, anchors[:, i + 1])
    tokens = torch.where(token_valid, tokens, torch.zeros_like(tokens))
    return AgentTokens(tokens, token_valid, recon, anchor_valid)


def decode(start: torch.Tensor, tokens: torch.Tensor, type_idx: torch.Tensor, vocab: MotionVocab) -> torch.Tensor:
    """Poses at 10 Hz reached by executing `tokens` from `start`.

    start [..., 3], tokens long [..., n], type_idx long [...] -> [..., n * SHIFT, 3]."""
    contours = vocab.contours.to(start.device)[type_idx[..., None], tokens]  # [..., n, SHIFT, 3]
    out = []
    current = start
    for i in range(tokens.shape[-1]):  # one composition per token
        step_poses = compose(current[..., None, :], contours[..., i, :, :])  # [..., SHIFT, 3]
        out.append(step_poses)
        current = step_poses[..., -1, :]
    return torch.cat(out, -2)  # [..., n * SHIFT, 3]


assert NUM_ANCHORS == NUM_TOKENS + 1
