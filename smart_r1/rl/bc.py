"""Behaviour cloning: teacher-forced next-token prediction over motion tokens.

    L_BC = - (1 / |V|) * sum_{(b, a, t) in V} log p_theta(token_{t+1} | tokens_{<=t}, map)

where V is the set of (scene, agent, slot) with a valid input token and a valid next token.
`bc_loss` is what the pipeline's learner loop (smart_r1.distributed.supervised_loop) minimises;
`bc_train_step` and `train_bc` are the standalone path (`smart-r1 train bc`, one process).
"""

from __future__ import annotations

import math
import random
import time

import torch
import torch.nn.functional as F

from smart_r1.config import BCConfig
from smart_r1.data.dataset import iter_scenarios
from smart_r1.model import precision
from smart_r1.model.checkpoint import save_checkpoint
from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import SmartTiny, teacher_targets
from smart_r1.rl.optim import make_optimizer, optimizer_step
from smart_r1.tokens.motion_vocab import MotionVocab, build_vocab
from smart_r1.tokens.scene import SceneBatch, build_scene, collate


def bc_loss(model, batch: SceneBatch, label_smoothing: float = 0.0,
            count: int | None = None) -> tuple[torch.Tensor, dict]:
    """Mean next-token cross-entropy over valid (scene, agent, slot) and its statistics.

    `label_smoothing` spreads that share of each target's mass uniformly over the vocabulary
    (SMART trains with 0.1). The forward runs under the process-wide precision
    (smart_r1.model.precision); the cross-entropy is taken in float32. `count`: the number of
    tokens the mean is over (default: this batch's, `bc_token_count`); with a whole batch's count
    the losses of its micro-batches add up to the batch's. The statistics are this batch's own."""
    with precision.autocast(batch.agent_mask.device):
        logits = model(batch)  # [B, A, 17, V]
    target, mask = teacher_targets(batch)  # [B, A, 17] each
    picked = logits[mask].float()  # [n, V]
    if picked.shape[0] == 0:
        zero = logits.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) intact
        return zero, {"loss": 0.0, "accuracy": 0.0, "tokens": 0}
    loss = F.cross_entropy(picked, target[mask], label_smoothing=label_smoothing)
    accuracy = (picked.argmax(-1) == target[mask]).float().mean()
    stats = {"loss": float(loss.detach()), "accuracy": float(accuracy), "tokens": int(mask.sum())}
    return (loss if count is None else loss * (stats["tokens"] / count)), stats


def bc_token_count(batch: SceneBatch) -> int:
    """The tokens `bc_loss` averages over: (scene, agent, slot) with this and the next token valid."""
    return int(teacher_targets(batch)[1].sum())


def bc_train_step(model, optimizer: torch.optim.Optimizer, batch: SceneBatch, grad_clip: float = 1.0,
                  scheduler=None) -> dict:
    """One optimisation step of L_BC on `batch` (moved to the model's device). Returns loss,
    accuracy, number of target tokens, gradient norm and the step's seconds."""
    start = time.perf_counter()
    device = next(model.parameters()).device
    batch = batch.to(device)
    model.train()
    loss, stats = bc_loss(model, batch)
    grad_norm = optimizer_step(model, optimizer, loss, grad_clip)
    if scheduler is not None:
        scheduler.step()
    stats.update(grad_norm=grad_norm, seconds=time.perf_counter() - start)
    return stats


def load_scenes(data, vocab: MotionVocab, cfg: BCConfig) -> list[SceneBatch]:
    """Tokenised single-scene batches of every scenario in `data` (folder or TFRecord glob)."""
    return [build_scene(rec, vocab, agents="all", max_agents=cfg.max_agents, max_map_segments=cfg.max_map_segments)
            for rec in iter_scenarios(data, cfg.max_scenarios)]


def train_bc(data, out, model_cfg: ModelConfig, cfg: BCConfig = BCConfig(), vocab: MotionVocab | None = None,
             vocab_size_data: int = 200, log=None) -> dict:
    """Train SMART-tiny by BC on `data` and save a checkpoint to `out` after every epoch.

    Without `vocab`, one is built from the first `vocab_size_data` scenarios. Returns a summary
    with per-epoch mean loss / accuracy and phase timings (vocab, tokenise, train)."""
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:  # the caller's thread count is its own (a test run or a notebook goes on after this)
        return _train_bc(data, out, model_cfg, cfg, vocab, vocab_size_data, log)
    finally:
        torch.set_num_threads(threads_before)


def _train_bc(data, out, model_cfg: ModelConfig, cfg: BCConfig, vocab: MotionVocab | None,
              vocab_size_data: int, log) -> dict:
    log = log or (lambda message: print(message, flush=True))
    torch.manual_seed(cfg.seed)
    timings = {}
    t0 = time.perf_counter()
    if vocab is None:
        vocab = build_vocab(iter_scenarios(data, vocab_size_data), size=model_cfg.vocab_size, seed=cfg.seed)
    timings["vocab_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scenes = load_scenes(data, vocab, cfg)
    timings["tokenize_s"] = time.perf_counter() - t0
    log(f"{len(scenes)} scenes tokenised in {timings['tokenize_s']:.0f} s")
    model = SmartTiny(model_cfg, vocab)
    steps_per_epoch = math.ceil(len(scenes) / cfg.batch_size)
    optimizer, scheduler = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.epochs * steps_per_epoch)
    rng = random.Random(cfg.seed)
    history, step, t_train = [], 0, time.perf_counter()
    stopped = False
    for epoch in range(cfg.epochs):
        rng.shuffle(scenes)
        sums = {"loss": 0.0, "accuracy": 0.0, "tokens": 0}
        for i in range(0, len(scenes), cfg.batch_size):
            stats = bc_train_step(model, optimizer, collate(scenes[i:i + cfg.batch_size]), cfg.grad_clip, scheduler)
            for k in ("loss", "accuracy"):
                sums[k] += stats[k] * stats["tokens"]
            sums["tokens"] += stats["tokens"]
            step += 1
            if step % 20 == 0:
                log(f"epoch {epoch} step {step}: loss {stats['loss']:.3f} acc {stats['accuracy']:.3f} "
                    f"({stats['seconds']:.2f} s/step)")
            if cfg.time_limit_s and time.perf_counter() - t_train > cfg.time_limit_s:
                stopped = True
                break
        n = max(sums["tokens"], 1)
        history.append({"epoch": epoch, "loss": sums["loss"] / n, "accuracy": sums["accuracy"] / n, "steps": step})
        log(f"epoch {epoch}: loss {history[-1]['loss']:.4f} accuracy {history[-1]['accuracy']:.3f}")
        save_checkpoint(out, model, {"stage": "bc", "epoch": epoch, "loss": history[-1]["loss"]})
        if stopped:
            break
    timings["train_s"] = time.perf_counter() - t_train
    return {"scenes": len(scenes), "steps": step, "history": history, "timings": timings,
            "stopped_by_time_limit": stopped, "checkpoint": str(out), "parameters": model.num_parameters()}
