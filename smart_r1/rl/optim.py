"""The optimiser step and learning-rate schedules every stage uses.

Gradients are averaged across data-parallel learners with one explicit all-reduce after the
step's last `backward()` (a step may accumulate several: `accumulated_step`) instead of wrapping
the model in DistributedDataParallel: the rollout and log-prob code calls the model's
submodules directly (`encode_map`, `decode`), which would bypass DDP's hooks. With
one learner (`world_size == 1`) nothing is communicated, so this runs anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist


def warmup_cosine(step: int, total_steps: int, warmup_steps: int = 50) -> float:
    """Learning-rate factor at `step`: linear warm-up, then cosine decay to 10% at `total_steps`."""
    warmup_steps = min(warmup_steps, max(1, total_steps // 10))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, lr: float = 5e-4, weight_decay: float = 0.01, total_steps: int = 1000,
                   warmup_steps: int = 50) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with linear warm-up then cosine decay to 10% of `lr`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def average_gradients(model: torch.nn.Module, world_size: int) -> None:
    """All-reduce and average every gradient over the learners (no-op for one learner)."""
    if world_size <= 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def accumulated_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, losses: Iterable[torch.Tensor],
                     grad_clip: float, world_size: int = 1) -> float:
    """One optimiser step on the sum of `losses`, each backpropagated as soon as it is made (its
    graph, and so its activations, freed before the next is built): gradients add up to those of
    the summed loss, with one part's memory instead of all of them. Pass a generator that builds
    each part's loss when asked. Then, once: average over learners, clip the norm, step. Returns
    the norm before clipping.

    Each learner all-reduces its accumulated gradient once, after its last backward (the model is
    not wrapped in DistributedDataParallel, so no hook fires per backward), and divides by
    `world_size`: accumulating on a rank changes nothing in how ranks are averaged, as long as the
    parts' losses are normalised by the rank's whole batch (their sum is the rank's loss).

    A non-finite part skips the update (the weights stay as they were; the later parts are still
    drawn but not backpropagated) and the returned norm is NaN or inf: one bad batch must not
    poison the weights. Every learner skips together: a non-finite loss on one learner makes its
    gradients NaN before the all-reduce.
    """
    optimizer.zero_grad(set_to_none=True)
    finite_loss = True
    for loss in losses:
        if finite_loss:
            finite_loss = bool(torch.isfinite(loss.detach()).all())
        if finite_loss:
            loss.backward()
        del loss  # this part's graph goes now, not when the next part's loss replaces it
    for p in model.parameters():  # every learner all-reduces the same list of tensors
        if p.requires_grad and (p.grad is None or not finite_loss):
            p.grad = torch.full_like(p, float("nan")) if not finite_loss else torch.zeros_like(p)
    average_gradients(model, world_size)
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    if math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                   grad_clip: float, world_size: int = 1) -> float:
    """backward, average gradients over learners, clip their norm, step (`accumulated_step` with
    one part). Returns the norm before clipping; NaN or inf, and no update, on a non-finite loss
    or gradient."""
    return accumulated_step(model, optimizer, [loss], grad_clip, world_size)


class NonFiniteGuard:
    """Counts updates skipped for a non-finite loss or gradient; more than `limit` in a row stop
    the stage with a clear error (a diverged run, not one bad batch)."""

    def __init__(self, where: str, limit: int):
        self.where, self.limit = where, limit
        self.in_a_row = 0
        self.skipped = 0

    def update(self, grad_norm: float, at: str) -> bool:
        """True if the update with this gradient norm was applied."""
        if math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row > self.limit:
            raise FloatingPointError(f"{self.where}: {self.in_a_row} updates in a row with a non-finite loss or "
                                     f"gradient (last at {at}); the run diverged: lower the learning rate or "
                                     f"check the data")
        return False
