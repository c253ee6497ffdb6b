"""Learner loop of the supervised stages, run by every Ray Train worker:

    bc        teacher-forced next-token cross-entropy on logged data (smart_r1.rl.bc), with
              warm-up and cosine decay of the learning rate (the SFT stages keep theirs constant)
    catk_sft  closed-loop SFT on CAT-K rollouts (smart_r1.rl.catk)

Each worker takes every world_size-th scenario; one report (metrics + checkpoint) per epoch.
"""

from __future__ import annotations

import math
import random

import torch

from smart_r1.data.dataset import iter_scenarios
from smart_r1.distributed.timing import PhaseTimer, format_phases
from smart_r1.distributed.worker_kit import (
    LearnerJob, Progress, fetch_checkpoint, maybe_fail, report, say, start_training,
)
from smart_r1.model.checkpoint import load_checkpoint
from smart_r1.rl.bc import bc_loss
from smart_r1.rl.catk import catk_sft_loss
from smart_r1.rl.optim import NonFiniteGuard, optimizer_step, set_learning_rate, warmup_cosine
from smart_r1.tokens.scene import build_scene, collate, scene_size, size_bucketed


class SceneCache:
    """This rank's training scenes, tokenised on first use: a stage that trains on part of the
    scenarios (`steps_per_epoch`) only pays for the scenes it draws."""

    def __init__(self, job: LearnerJob, vocab, rank: int, world_size: int):
        everything = list(iter_scenarios(job.datasets["train"]))
        self.total = len(everything)  # training scenarios over all ranks
        # BC learns from every agent with tokens; closed-loop SFT unrolls the sim agents.
        self.agents = "all" if job.stage.kind == "bc" else "sim"
        self.records = [r for r in everything[rank::world_size] if r.sim_agent_mask.any() or self.agents == "all"]
        self.vocab = vocab
        self.scenes: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        if i not in self.scenes:
            self.scenes[i] = build_scene(self.records[i], self.vocab, agents=self.agents,
                                         max_agents=64 if self.agents == "all" else 128)
        return self.scenes[i]


def supervised_loop(config: dict) -> None:
    job: LearnerJob = config["job"]
    stage = job.stage
    model, optimizer, device, rank, world_size, start_epoch = start_training(job, "epoch")
    timer = PhaseTimer()
    scenes = SceneCache(job, model.vocab, rank, world_size)
    if not len(scenes):
        raise ValueError(f"stage {stage.name}: no training scenes with agents on rank {rank}")
    order = list(range(len(scenes)))
    # Every rank takes the same number of steps (their gradients are all-reduced together);
    # a rank with fewer scenes wraps around its own.
    steps_per_epoch = stage.steps_per_epoch or math.ceil(scenes.total / world_size / stage.batch_scenarios)
    if rank == 0:  # the rule: batch_scenarios is per learner; lr is used as given, never rescaled
        say(f"[{stage.name}] global batch {world_size} learners x {stage.batch_scenarios} scenarios = "
            f"{world_size * stage.batch_scenarios}, lr {stage.lr:g}, {steps_per_epoch} steps per epoch")
    progress = Progress(stage.name, stage.epochs * steps_per_epoch, start_epoch * steps_per_epoch, rank == 0)
    torch.manual_seed(job.seed + rank)
    # the stage's starting policy, frozen: the anchor of the KL term (a resumed run keeps it)
    anchor = load_checkpoint(fetch_checkpoint(job.init_checkpoint), map_location=device).eval() \
        if getattr(stage, "anchor_weight", 0.0) else None
    guard = NonFiniteGuard(f"stage {stage.name}", stage.max_nonfinite_updates)
    for epoch in range(start_epoch, stage.epochs):
        maybe_fail(job, epoch)
        rng = random.Random(job.seed * 7919 + epoch)
        rng.shuffle(order)
        totals = {"loss": 0.0, "accuracy": 0.0, "tokens": 0}
        skipped_before = guard.skipped
        # this epoch's draws in order, batched by size (less padding) window by window
        draws = [order[k % len(order)] for k in range(steps_per_epoch * stage.batch_scenarios)]
        batches = size_bucketed(draws, stage.batch_scenarios, lambda k: scene_size(scenes[k]), rng)
        for i in range(steps_per_epoch):
            with timer.phase("tokenize"):  # first use only
                picked = [scenes[k] for k in next(batches)]
            batch = collate(picked).to(device)
            if stage.kind == "bc":  # pretraining from scratch: warm-up, then cosine decay to 10%
                factor = warmup_cosine(epoch * steps_per_epoch + i, stage.epochs * steps_per_epoch)
                set_learning_rate(optimizer, stage.lr * factor)
            model.train()
            with timer.phase("forward"):
                if stage.kind == "bc":
                    loss, stats = bc_loss(model, batch, stage.label_smoothing)
                else:
                    loss, stats = catk_sft_loss(model, batch, stage.catk_k, bc_weight=stage.bc_weight,
                                                 label_smoothing=stage.label_smoothing, anchor=anchor,
                                                 anchor_weight=stage.anchor_weight)
            with timer.phase("update"):
                grad_norm = optimizer_step(model, optimizer, loss, stage.grad_clip, world_size)
            if not guard.update(grad_norm, f"epoch {epoch} step {i}"):
                say(f"[{stage.name}] epoch {epoch} step {i}: non-finite loss or gradient, update skipped")
                continue
            for k in ("loss", "accuracy"):
                totals[k] += stats[k] * stats["tokens"]
            totals["tokens"] += stats["tokens"]
            done = epoch * steps_per_epoch + i + 1
            if i % max(1, steps_per_epoch // 4) == 0 or i == steps_per_epoch - 1:
                progress.line(done, f"epoch {epoch + 1}/{stage.epochs} loss {stats['loss']:.3f} "
                                    f"acc {stats['accuracy']:.3f} |grad| {grad_norm:.2f}")
        n = max(totals["tokens"], 1)
        times = timer.lap()
        metrics = {"epoch": epoch, "loss": totals["loss"] / n, "accuracy": totals["accuracy"] / n,
                   "nonfinite_skipped": guard.skipped - skipped_before, **times}
        if rank == 0:
            say(f"[{stage.name}] epoch {epoch + 1}/{stage.epochs}: loss {metrics['loss']:.4f} "
                f"accuracy {metrics['accuracy']:.3f} | {format_phases(times)}")
        report(job, model, optimizer, epoch, metrics, rank)
