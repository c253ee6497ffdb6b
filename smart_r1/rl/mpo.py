"""Metric-oriented Policy Optimization (MPO), the RFT stage of SMART-R1 (arXiv 2509.23993).

For a batch of sampled closed-loop rollouts with rewards R from the WOSAC metrics:

    A = R - alpha                                   (eq. MPO-1: fixed baseline, no group
                                                     normalisation, no critic: the metric's
                                                     level is known, so alpha is set to it)
    L = -mean_{r,a,t}[ A * log pi(x_t | s_t) ] + beta * mean_{r,a,t}[ KL(pi || pi_ref)_t ]
                                                    (eq. MPO-2)

When a batch is reused for several updates, log pi is replaced by the clipped ratio surrogate
min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) with rho = pi / pi_old (eq. MPO-3, optional).

pi is the distribution the rollouts were sampled from: with top-k sampling, the model's tempered
top k (`smart_r1.rollout.sampling.sampled_log_probs`). With the unfiltered log-prob instead, every
update also moves the logits of tokens that were never sampled (when the mean advantage is
negative, it lifts that tail towards the top k). On the default preset, RFT at lr 1e-4 took the
held-out metametric from 0.52 to 0.36 with the unfiltered log-probs and dropout on in the update,
and to 0.53 with both fixed (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MPOStats:
    loss: float
    policy_loss: float
    kl: float
    mean_advantage: float
    clip_fraction: float


def advantages(rewards: torch.Tensor, alpha: float) -> torch.Tensor:
    """A = R - alpha (eq. MPO-1). rewards: [R] per rollout or [R, S] per agent."""
    return rewards - alpha


def kl_per_token(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str = "k3",
                 full_log_probs: torch.Tensor | None = None,
                 full_ref_log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """KL(pi || pi_ref) per token, [R, S, T].

    estimator:
        "k3":   exp(q - p) - (q - p) - 1 on the sampled token, with p = log pi, q = log pi_ref:
                unbiased for KL(pi || pi_ref) under samples from pi, and never negative.
        "full": the exact KL over the whole vocabulary; needs full_log_probs [R, S, T, V] and
                full_ref_log_probs [R, S, T, V].
    """
    if estimator == "k3":
        d = ref_log_probs - log_probs
        return torch.exp(d) - d - 1.0
    if estimator == "full":
        if full_log_probs is None or full_ref_log_probs is None:
            raise ValueError("the 'full' KL estimator needs the full log-probabilities of both models")
        return (full_log_probs.exp() * (full_log_probs - full_ref_log_probs)).sum(-1)
    raise ValueError(f"unknown KL estimator {estimator!r} (use 'k3' or 'full')")


def mpo_loss(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, rewards: torch.Tensor,
             mask: torch.Tensor, alpha: float, beta: float,
             old_log_probs: torch.Tensor | None = None, clip_eps: float | None = None,
             kl_estimator: str = "k3", full_log_probs: torch.Tensor | None = None,
             full_ref_log_probs: torch.Tensor | None = None) -> tuple[torch.Tensor, MPOStats]:
    """The MPO loss (eq. MPO-2, or MPO-3 with clipping).

    Args:
        log_probs: [R, S, T] log pi of the sampled tokens under the policy being trained (grad).
        ref_log_probs: [R, S, T] log pi_ref of the same tokens under the frozen reference.
        rewards: [R] per-rollout rewards, or [R, S] per-agent rewards (per-agent credit).
        mask: [R, S, T] bool, the tokens that count (valid agents and steps).
        alpha: the fixed baseline. beta: the KL weight.
        old_log_probs: [R, S, T] log pi_old at sampling time; with clip_eps, enables MPO-3.
    """
    adv = advantages(rewards, alpha)
    while adv.dim() < log_probs.dim():
        adv = adv.unsqueeze(-1)  # [R] -> [R, 1, 1] or [R, S] -> [R, S, 1]
    adv = adv.expand_as(log_probs)
    m = mask.to(log_probs.dtype)
    count = m.sum().clamp_min(1.0)
    clip_fraction = torch.zeros(())
    if clip_eps is not None and old_log_probs is not None:
        ratio = torch.exp(log_probs - old_log_probs)
        clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
        surrogate = torch.minimum(ratio * adv, clipped * adv)
        clip_fraction = (((ratio - clipped).abs() > 0).to(m.dtype) * m).sum() / count
    else:
        surrogate = adv * log_probs
    policy_loss = -(surrogate * m).sum() / count
    kl = (kl_per_token(log_probs, ref_log_probs, kl_estimator, full_log_probs, full_ref_log_probs)
          * m).sum() / count
    loss = policy_loss + beta * kl
    stats = MPOStats(loss=float(loss.detach()), policy_loss=float(policy_loss.detach()),
                     kl=float(kl.detach()), mean_advantage=float((adv * m).sum() / count),
                     clip_fraction=float(clip_fraction))
    return loss, stats
