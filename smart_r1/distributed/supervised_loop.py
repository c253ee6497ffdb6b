"""Learner loop of the supervised stages, run by every Ray Train worker:

    bc        teacher-forced next-token cross-entropy on logged data (smart_r1.rl.bc), with
              warm-up and cosine decay of the learning rate (the SFT stages keep theirs constant)
    catk_sft  closed-loop SFT on CAT-K rollouts (smart_r1.rl.catk)

Each rank streams its own part of the training scenes (`smart_r1.data.stream`): per epoch the
row groups of the token shards are shuffled (the same seeded order on every rank) and dealt to the
ranks; a rank reads its row groups in turn through a shuffle buffer of `SHUFFLE_SCENES` scenes and
batches them by size window by window (`size_bucketed`). Its memory holds the buffer, one window
and one decoded row group, never the dataset. Every rank takes the same number of steps per epoch
(their gradients are all-reduced): ceil(scenes / world_size / batch_scenarios), or the stage's
`steps_per_epoch`; a rank whose row groups hold fewer scenes goes round them again.

The scenes come tokenised (`job.scenes`: the token shards the pipeline wrote once, before the first
stage, `smart_r1.tokens.cache`); a caller that did not tokenise (a test, a benchmark) gets the
training records tokenised as they are read. One report (metrics + checkpoint) per epoch.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from smart_r1.data.index import ShardIndex, scenario_index
from smart_r1.data.parquet import shard_paths
from smart_r1.data.stream import epoch_rows, rank_units
from smart_r1.distributed.memory_estimate import batch_splitter
from smart_r1.distributed.timing import PhaseTimer, format_phases
from smart_r1.distributed.worker_kit import (
    LearnerJob, Progress, fetch_checkpoint, maybe_fail, peak_rss_mb, report, say, start_training,
)
from smart_r1.model.checkpoint import load_checkpoint
from smart_r1.rl.bc import bc_loss, bc_token_count
from smart_r1.rl.catk import catk_sft_loss, catk_token_count
from smart_r1.rl.optim import NonFiniteGuard, accumulated_step, set_learning_rate, warmup_cosine
from smart_r1.storage import join, read_json
from smart_r1.tokens.cache import DONE_NAME, STAGE_OPTIONS, vocab_hash
from smart_r1.tokens.motion_vocab import MotionVocab
from smart_r1.tokens.scene import SceneBatch, build_scene, collate, scene_size, size_bucketed, with_noisy_tokens
from smart_r1.tokens.shards import table_to_scenes

SHUFFLE_SCENES = 128  # scenes a rank holds to shuffle: ~35 MB of WOMD scenes (~270 KB each)
WINDOW_BATCHES = 8  # size_bucketed's window: batches sorted by size together


@dataclass(frozen=True)
class SceneSource:
    """Where a rank's scenes come from: `units` row groups holding `total` scenes (all ranks
    together); `read_unit(u)` -> the scenes (SceneBatch, B = 1) of row group u."""

    units: int
    total: int
    read_unit: Callable[[int], list[SceneBatch]]


def scene_source(job: LearnerJob, vocab: MotionVocab) -> SceneSource:
    """The stage's token shards (`job.scenes`), checked against the model's vocabulary; without
    them, the training records tokenised as read (nothing cached beyond one row group)."""
    options = STAGE_OPTIONS[job.stage.kind]
    if job.scenes:
        made_with = read_json(join(job.scenes, DONE_NAME), {}).get("vocab")
        if made_with != vocab_hash(vocab):
            raise ValueError(f"stage {job.stage.name}: token shards {job.scenes} were made with vocabulary "
                             f"{made_with}, the model's is {vocab_hash(vocab)}")
        tokens = ShardIndex([str(p) for p in shard_paths(job.scenes)], table_to_scenes, cache_groups=1)
        return SceneSource(len(tokens.units), len(tokens), tokens.read_unit)
    records = scenario_index(job.datasets["train"], cache_groups=1)

    def tokenised(unit: int) -> list[SceneBatch]:
        return [build_scene(r, vocab, agents=options.agents, max_agents=options.max_agents)
                for r in records.read_unit(unit) if options.keeps(r)]

    return SceneSource(len(records.units), len(records), tokenised)


def batches(scenes: Iterator[SceneBatch], batch_size: int, rng: random.Random) -> Iterator[list[SceneBatch]]:
    """Batches of the stream bucketed by size (less padding), one window of WINDOW_BATCHES
    batches at a time."""
    while window := list(itertools.islice(scenes, batch_size * WINDOW_BATCHES)):
        yield from size_bucketed(window, batch_size, scene_size, rng, WINDOW_BATCHES)


def step_losses(model, stage, parts: list[SceneBatch], anchor, stats: list[dict]) -> Iterator[torch.Tensor]:
    """The loss of each micro-batch of one step, built when asked (`accumulated_step` runs its
    backward before the next is built), normalised by the whole batch's token counts so that the
    parts add up to the batch's loss; each part's statistics are appended to `stats`."""
    split = len(parts) > 1
    bc_count = sum(bc_token_count(p) for p in parts) if split else None
    count = sum(catk_token_count(p) for p in parts) if split and stage.kind != "bc" else None
    for part in parts:
        start = time.perf_counter()
        if stage.kind == "bc":
            loss, part_stats = bc_loss(model, part, stage.label_smoothing, count=bc_count)
        else:
            loss, part_stats = catk_sft_loss(model, part, stage.catk_k, bc_weight=stage.bc_weight,
                                             label_smoothing=stage.label_smoothing, anchor=anchor,
                                             anchor_weight=stage.anchor_weight, count=count, bc_count=bc_count)
        stats.append({**part_stats, "forward_s": time.perf_counter() - start})
        yield loss


def combined(stats: list[dict]) -> dict:
    """One step's loss and accuracy (token-weighted means over its micro-batches) and tokens."""
    tokens = sum(s["tokens"] for s in stats)
    mean = lambda k: sum(s[k] * s["tokens"] for s in stats) / max(tokens, 1)  # noqa: E731
    return stats[0] if len(stats) == 1 else {"loss": mean("loss"), "accuracy": mean("accuracy"), "tokens": tokens}


def supervised_loop(config: dict) -> None:
    job: LearnerJob = config["job"]
    stage = job.stage
    model, optimizer, device, rank, world_size, start_epoch = start_training(job, "epoch")
    timer = PhaseTimer()
    source = scene_source(job, model.vocab)
    noise_top_k = getattr(stage, "token_noise_top_k", 1)  # BC stages only
    # Every rank takes the same number of steps (their gradients are all-reduced together).
    steps_per_epoch = stage.steps_per_epoch or math.ceil(source.total / world_size / stage.batch_scenarios)
    if rank == 0:  # the rule: batch_scenarios is per learner; lr is used as given, never rescaled
        say(f"[{stage.name}] global batch {world_size} learners x {stage.batch_scenarios} scenarios = "
            f"{world_size * stage.batch_scenarios}, lr {stage.lr:g}, {steps_per_epoch} steps per epoch; "
            f"{source.total} scenes in {source.units} row groups"
            + (f"; token noise: each token after the first drawn among the {noise_top_k} closest" if noise_top_k > 1 else ""))
    progress = Progress(stage.name, stage.epochs * steps_per_epoch, start_epoch * steps_per_epoch, rank == 0)
    torch.manual_seed(job.seed + rank)
    # the stage's starting policy, frozen: the anchor of the KL term (a resumed run keeps it)
    anchor = load_checkpoint(fetch_checkpoint(job.init_checkpoint), map_location=device).eval() \
        if getattr(stage, "anchor_weight", 0.0) else None
    guard = NonFiniteGuard(f"stage {stage.name}", stage.max_nonfinite_updates)
    split = batch_splitter(stage, model.cfg, device)
    for epoch in range(start_epoch, stage.epochs):
        maybe_fail(job, epoch)
        units = rank_units(source.units, rank, world_size, random.Random(job.seed * 7919 + epoch))
        rng = random.Random((job.seed * 7919 + epoch) * 1009 + rank)  # this rank's shuffles
        noise = torch.Generator(device=device).manual_seed((job.seed * 7919 + epoch) * 1009 + rank)
        totals = {"loss": 0.0, "accuracy": 0.0, "tokens": 0}
        skipped_before = guard.skipped
        scenes = epoch_rows(source.read_unit, units, steps_per_epoch * stage.batch_scenarios, SHUFFLE_SCENES, rng)
        drawn = batches(scenes, stage.batch_scenarios, rng)
        for i in range(steps_per_epoch):
            with timer.phase("data"):  # reading and decoding token shards
                picked = next(drawn)
            parts = [collate(group).to(device) for group in split(picked)]  # micro-batches: one, unless over budget
            if noise_top_k > 1:
                parts = [with_noisy_tokens(part, model.vocab, noise_top_k, noise) for part in parts]
            if stage.kind == "bc":  # pretraining from scratch: warm-up, then cosine decay to 10%
                factor = warmup_cosine(epoch * steps_per_epoch + i, stage.epochs * steps_per_epoch)
                set_learning_rate(optimizer, stage.lr * factor)
            model.train()
            part_stats: list[dict] = []
            start = time.perf_counter()  # forward and backward of each micro-batch in turn, then the update
            grad_norm = accumulated_step(model, optimizer, step_losses(model, stage, parts, anchor, part_stats),
                                         stage.grad_clip, world_size)
            forward = sum(p.pop("forward_s") for p in part_stats)
            timer.add("forward", forward)
            timer.add("update", time.perf_counter() - start - forward)  # backward passes and the optimiser step
            stats = combined(part_stats)
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
                   "nonfinite_skipped": guard.skipped - skipped_before, "peak_rss_mb": peak_rss_mb(), **times}
        if rank == 0:
            say(f"[{stage.name}] epoch {epoch + 1}/{stage.epochs}: loss {metrics['loss']:.4f} "
                f"accuracy {metrics['accuracy']:.3f} | {format_phases(times)}")
        report(job, model, optimizer, epoch, metrics, rank)
