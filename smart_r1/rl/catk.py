"""Closed-loop supervised fine-tuning with CAT-K rollouts (Zhang et al., CVPR 2025).

1. Unroll the policy from the logged history. At each 0.5 s step keep the K most likely tokens
   and execute the one closest to the log over the coming 0.5 s (`CatKSelector`, by the
   tokenizer's distance), so the visited states stay near the log while still being the policy's
   own. With the targets' criterion, the executed token is the target whenever the target is
   among the top K (with K = V the rollout replays the tokenizer exactly; a test checks it).
2. At every visited state s_t, the target is the token that leads from s_t towards the log: the
   token of the whole vocabulary whose 0.5 s contour from s_t best follows the logged poses of
   the next interval, by the tokenizer's own distance (so a state on the log gets its BC token;
   a different criterion would contradict the BC labels even without drift).
3. Minimise the cross-entropy of those targets, teacher-forced on the visited states:

       L_SFT = - (1 / |V|) * sum_{(b, r, a, t) in V} log p_theta(y_t | s_<=t, map)      (eq. CAT-K)

   with V the valid (scene, rollout, agent, step) whose logged target exists.

Measured on a weak BC policy (`make run`'s, top-1 accuracy ~0.3; BENCHMARKS.md, "Closed-loop
SFT ablation"): its top-K tokens rarely turn as much as the log, so moving agents drift off the
log's heading and fall behind it, and the targets are strong corrections, each towards the
agent's own logged position while its neighbours have drifted too. SFT on them alone costs 0.11
of realism (collisions x3); adding the log's own BC loss (`bc_weight`, 3 in `make run`) keeps the
log's states in the mix and the cost within noise. The paper starts from a BC model whose top K
contain the log's move, where the targets stay small.
"""

from __future__ import annotations

import torch

from smart_r1.rl.bc import bc_loss
from smart_r1.rollout.closed_loop import RolloutTensors, closed_loop, token_log_probs
from smart_r1.rollout.sampling import catk_selector
from smart_r1.tokens.tokenize import best_tokens
from smart_r1.tokens.motion_vocab import NUM_FUTURE_TOKENS, NUM_HISTORY_TOKENS, SHIFT, MotionVocab
from smart_r1.tokens.scene import SceneBatch


def catk_targets(batch: SceneBatch, rollout: RolloutTensors, vocab: MotionVocab) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets [B, R, A, 16] (long) and their validity [B, R, A, 16] (bool) for visited states.

    From each visited state the target is chosen exactly as the tokenizer chooses a logged token
    (`best_tokens`: the contour that best follows the logged poses of the next 0.5 s), so on the
    log itself the targets are the BC tokens and CAT-K only adds what drift requires."""
    b, r, a = rollout.tokens.shape[:3]
    reached = rollout.poses[:, :, :, SHIFT - 1::SHIFT]  # [B, R, A, 16, 3] pose after each token
    now = batch.anchor_pose[:, None, :, NUM_HISTORY_TOKENS].expand(b, r, a, 3)  # [B, R, A, 3]
    start = torch.cat([now[:, :, :, None], reached[:, :, :, :-1]], 3).reshape(b * r * a, NUM_FUTURE_TOKENS, 3)
    valid = catk_valid(batch)[:, None].expand(b, r, a, NUM_FUTURE_TOKENS)  # [B, R, A, 16]
    types = batch.agent_type[:, None].expand(b, r, a).reshape(-1)  # [N]
    contours = vocab.contours.to(start.device)[types]  # [N, V, SHIFT, 3]
    log = batch.log_pose[:, None].expand(b, r, *batch.log_pose.shape[1:]).reshape(b * r * a, -1, 3)  # [N, 91, 3]
    log_valid = batch.log_valid[:, None].expand(b, r, *batch.log_valid.shape[1:]).reshape(b * r * a, -1)
    targets = []
    for t in range(NUM_FUTURE_TOKENS):  # one step at a time bounds memory to [N, V, SHIFT, 3]
        steps = slice((NUM_HISTORY_TOKENS + t) * SHIFT + 1, (NUM_HISTORY_TOKENS + t + 1) * SHIFT + 1)
        best, _ = best_tokens(start[:, t], contours, log[:, steps], log_valid[:, steps], types)
        targets.append(best.view(b, r, a))
    return torch.stack(targets, -1), valid  # [B, R, A, 16] each


def catk_valid(batch: SceneBatch) -> torch.Tensor:
    """bool [B, A, 16]: the (agent, step) whose logged target exists, for sim agents: every
    rollout's tokens that count (known before rolling out)."""
    live = (batch.sim_mask & batch.agent_mask)[:, :, None]  # [B, A, 1]
    return batch.anchor_valid[:, :, NUM_HISTORY_TOKENS + 1:] & live


def catk_token_count(batch: SceneBatch, num_rollouts: int = 1) -> int:
    """The tokens `catk_sft_loss` averages over: num_rollouts times the valid (agent, step)."""
    return num_rollouts * int(catk_valid(batch).sum())


def catk_sft_loss(model, batch: SceneBatch, catk_k: int, num_rollouts: int = 1, bc_weight: float = 0.0,
                  label_smoothing: float = 0.0, anchor=None, anchor_weight: float = 0.0,
                  count: int | None = None, bc_count: int | None = None) -> tuple[torch.Tensor, dict]:
    """L_SFT on one batch: CAT-K rollouts (no gradient), then the teacher-forced cross-entropy,
    plus `bc_weight` times the log's own next-token loss (L_BC on the same scenes), plus
    `anchor_weight` times the KL from a frozen `anchor` policy on the visited states:

        L = L_SFT + bc_weight * L_BC + anchor_weight * mean_{(b, r, a, t) in V} KL(pi_anchor || pi_theta)

    The log term keeps the states the log visits in the training distribution, so what CAT-K
    adds (recovery from the policy's own drift) does not replace what BC learnt. Both terms
    take `label_smoothing` (share of each target's mass spread over the vocabulary). The anchor
    term (the stage's starting policy, e.g. the RFT policy in the final SFT) keeps the
    distribution near the anchor's wherever the targets do not pull, so SFT does not undo what
    an earlier stage learnt that the log cannot teach.

    `count` and `bc_count`: the tokens the CAT-K (and anchor) means and the log term's mean are
    over (default: this batch's, `catk_token_count` and `bc_token_count`); with a whole batch's
    counts the losses of its micro-batches add up to the batch's. The statistics are this batch's.

    `model` may be wrapped (e.g. DistributedDataParallel); it is left in train mode."""
    core = getattr(model, "module", model)
    with torch.no_grad():
        selector = catk_selector(batch, num_rollouts, catk_k)
        rollout = closed_loop(core, batch, num_rollouts, selector)
        targets, valid = catk_targets(batch, rollout, core.vocab)
    core.train()
    _, logp_all = token_log_probs(model, batch, rollout.tokens, rollout.poses, full=True)  # [B, R, A, 16, V]
    stats = {"loss": 0.0, "accuracy": 0.0, "tokens": 0, "executed_is_target": 0.0}
    if valid.any():
        picked = logp_all.gather(-1, targets[..., None])[..., 0][valid]  # [n]
        nll = -picked.mean()
        loss = nll if not label_smoothing else \
            (1 - label_smoothing) * nll - label_smoothing * logp_all[valid].mean()
        stats.update(loss=float(loss.detach()), tokens=int(valid.sum()),
                     accuracy=float((logp_all.argmax(-1) == targets)[valid].float().mean()),
                     executed_is_target=float((rollout.tokens == targets)[valid].float().mean()))
    else:
        loss = logp_all.sum() * 0.0  # keeps the graph intact
    if anchor_weight and valid.any():
        with torch.no_grad():
            anchor.eval()
            _, anchor_all = token_log_probs(anchor, batch, rollout.tokens, rollout.poses, full=True)  # [B, R, A, 16, V]
        kl = (anchor_all.exp() * (anchor_all - logp_all)).sum(-1)[valid].mean()
        loss = loss + anchor_weight * kl
        stats.update(anchor_kl=float(kl.detach()))
    if count is not None:  # means over this batch's tokens -> sums over the whole batch's
        loss = loss * (stats["tokens"] / count)
    if bc_weight:
        log_loss, log_stats = bc_loss(model, batch, label_smoothing, count=bc_count)
        loss = loss + bc_weight * log_loss
        stats.update(log_loss=log_stats["loss"], log_accuracy=log_stats["accuracy"])
    return loss, stats
