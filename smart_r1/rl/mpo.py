"""Metric-oriented Policy Optimization (MPO), the RFT stage of SMART-R1 (arXiv 2509.23993).

For a batch of sampled closed-loop rollouts with rewards R from the WOSAC metrics:

    A = R - alpha                                   (eq. MPO-1: fixed baseline, no group
                                                     normalisation, no critic: the metric's
                                                     level is known, so alpha is set to it)
    L = -mean_{r,a,t}[ A * log pi(x_t | s_t) ] + beta * mean_{r,a,t}[ KL(pi || pi_ref)_t ]
                                                    (eq. MPO-2)

When the batch is off-policy, log pi is replaced by the clipped ratio surrogate
min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) with rho = pi / pi_old (eq. MPO-3): when a batch is
reused for several updates (`updates_per_batch > 1`), or when some of its rollouts were sampled
with older weights than the ones being updated (stale: with `max_staleness >= 1` the next step's
rollouts are sampled while this step updates). A batch sampled by the current weights and used
once is on-policy and gets MPO-2 as written; `mpo_step` reports which objective it applied.

pi is the distribution the rollouts were sampled from: with top-k sampling, the model's tempered
top k (`smart_r1.rollout.sampling.sampled_log_probs`). With the unfiltered log-prob instead, every
update also moves the logits of tokens that were never sampled (when the mean advantage is
negative, it lifts that tail towards the top k). On the default preset, RFT at lr 1e-4 took the
held-out metametric from 0.52 to 0.36 with the unfiltered log-probs and dropout on in the update,
and to 0.53 with both fixed (BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from smart_r1.config import MPOStage
from smart_r1.rl.experience import ExperienceBatch
from smart_r1.rl.optim import accumulated_step
from smart_r1.rollout.closed_loop import token_log_probs


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
             full_ref_log_probs: torch.Tensor | None = None,
             count: float | None = None) -> tuple[torch.Tensor, MPOStats]:
    """The MPO loss (eq. MPO-2, or MPO-3 with clipping).

    Args:
        log_probs: [R, S, T] log pi of the sampled tokens under the policy being trained (grad).
        ref_log_probs: [R, S, T] log pi_ref of the same tokens under the frozen reference.
        rewards: [R] per-rollout rewards, or [R, S] per-agent rewards (per-agent credit).
        mask: [R, S, T] bool, the tokens that count (valid agents and steps).
        alpha: the fixed baseline. beta: the KL weight.
        old_log_probs: [R, S, T] log pi_old at sampling time; with clip_eps, enables MPO-3.
        count: the number of tokens the means are over (default: mask.sum()); with the batch's
            count, the losses and statistics of its parts add up to the batch's.
    """
    adv = advantages(rewards, alpha)
    while adv.dim() < log_probs.dim():
        adv = adv.unsqueeze(-1)  # [R] -> [R, 1, 1] or [R, S] -> [R, S, 1]
    adv = adv.expand_as(log_probs)
    m = mask.to(log_probs.dtype)
    count = m.sum().clamp_min(1.0) if count is None else count
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


def mpo_step(model: torch.nn.Module, ref_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             batch: ExperienceBatch, stage: MPOStage, policy_version: int, world_size: int = 1,
             per_scene: bool = True) -> dict:
    """One RL step of MPO: `stage.updates_per_batch` updates of `model` on `batch`.

    pi is the distribution the actors sampled from (the model's tokens tempered and filtered as
    `stage.sampling` says); the update runs in eval mode (no dropout), so pi is exactly the
    sampling policy, as in RLHF practice. The clipped surrogate (MPO-3) is used when the batch is
    reused or holds rollouts of weights older than `policy_version`; otherwise MPO-2.

    Memory: the loss is a sum over tokens divided by the whole batch's token count, so it splits
    into parts whose gradients add up to the batch's. Each part is built and backpropagated on its
    own (`accumulated_step`), one graph at a time: a scene (with `per_scene`, run on its own
    agents and map segments instead of the batch's padding), or `stage.rollouts_per_backward`
    rollouts of it where one scene's activations do not fit (0 = the whole scene). The learner's
    peak is one part's, whatever the number of scenes; the step and its statistics are the
    single graph's up to float rounding (tests/rl/test_mpo_reuse.py).

    What it need not compute, it does not: log pi_ref comes with the batch when the rollout
    workers computed it (`batch.ref_log_probs`, the same `token_log_probs` on the same rollouts).
    Otherwise the reference runs here: once per part for the sampled tokens (kept across
    updates: [1, r, A, 16] each), or, for the 'full' KL estimator, per part and update beside
    the part's graph (its [1, r, A, 16, V] log-probs are not kept: they would be as large as the
    activations saved).
    Returns the last update's statistics plus `grad_norm` and `clipped_objective` (0 or 1).
    """
    full = stage.kl_estimator == "full"
    sampling = dataclasses.asdict(stage.sampling)
    off_policy = stage.updates_per_batch > 1 or bool((batch.versions != policy_version).any())
    scenes = batch.per_scene() if per_scene and batch.tokens.shape[0] > 1 else [batch]
    parts = [chunk for scene in scenes for chunk in scene.rollout_chunks(stage.rollouts_per_backward)]
    count = batch.live.sum().clamp_min(1).float()  # the batch's tokens: every part's normaliser

    def log_probs(net, part):  # ([B, r, A, 16], [B, r, A, 16, V] or None)
        out = token_log_probs(net, part.scenes, part.tokens, part.poses, full=full, **sampling)
        return out if full else (out, None)

    def reference(part):  # log pi_ref of the part's tokens (and the whole vocabulary's, for 'full')
        if part.ref_log_probs is not None and not full:
            return part.ref_log_probs, None
        with torch.no_grad():
            return log_probs(ref_model, part)

    kept = None if full else [reference(part) for part in parts]
    model.eval()
    stats, grad_norm = None, 0.0
    for _ in range(stage.updates_per_batch):
        sums = {}

        def losses():  # each part's loss, built when the optimiser step asks for it
            for i, part in enumerate(parts):
                b, r = part.tokens.shape[:2]
                flat = lambda x: None if x is None else x.reshape(b * r, *x.shape[2:])  # [B, r, ...] -> [B * r, ...]
                ref_lp, ref_full = reference(part) if kept is None else kept[i]
                lp, lp_full = log_probs(model, part)
                loss, part_stats = mpo_loss(
                    flat(lp), flat(ref_lp), flat(part.rewards), flat(part.live), stage.alpha, stage.beta,
                    old_log_probs=flat(part.old_log_probs) if off_policy else None,
                    clip_eps=stage.clip_eps, kl_estimator=stage.kl_estimator,
                    full_log_probs=flat(lp_full), full_ref_log_probs=flat(ref_full), count=count)
                for k, v in vars(part_stats).items():  # every statistic is a sum over tokens / count
                    sums[k] = sums.get(k, 0.0) + v
                del lp, lp_full, ref_full  # nothing of this part outlives its backward
                yield loss

        grad_norm = accumulated_step(model, optimizer, losses(), stage.grad_clip, world_size)
        stats = MPOStats(**sums)
    return {**vars(stats), "grad_norm": grad_norm, "clipped_objective": int(off_policy)}
