"""Closed-loop rollout speed: KV-cached decoding against recomputing the whole history each step.

32 rollouts of every sim agent of the shared real scenario, 16 tokens (80 steps). Both runs use the
greedy selector so they must choose the same tokens (checked). Reports agent-steps per second
(rollouts x agents x 80 / seconds), the speed-up, and peak memory (CUDA: max allocated; CPU: the
process's peak resident set after each run). Last line: `speedup <ratio> agent_steps_per_s <value>`.

    python benchmarks/bench_rollout.py [--checkpoint CKPT] [--preset cpu] [--rollouts 32]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from smart_r1.data.womd import read_scenarios
from smart_r1.model.checkpoint import load_checkpoint
from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.rollout.closed_loop import closed_loop
from smart_r1.rollout.sampling import Greedy
from smart_r1.tokens.motion_vocab import build_vocab
from smart_r1.tokens.scene import build_scene

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "womd" / "motion_data_one_scenario.tfrecord"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(model, scene, rollouts: int, use_cache: bool, device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = closed_loop(model, scene, rollouts, Greedy(), use_cache=use_cache)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start, peak_memory_mb(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None, help="SMART-tiny checkpoint (default: random weights)")
    parser.add_argument("--preset", default="cpu", help="model preset when no checkpoint is given")
    parser.add_argument("--rollouts", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scenario", default=str(SHARED))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record = next(read_scenarios(args.scenario))
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint, device)
    else:
        cfg = ModelConfig.preset(args.preset)
        model = SmartTiny(cfg, build_vocab([record], size=cfg.vocab_size, iters=4)).to(device).eval()
    scene = build_scene(record, model.vocab, agents="sim")
    agents = int(scene.sim_mask.sum())
    print(f"device {device}, {model.num_parameters():,} parameters, {agents} sim agents, "
          f"{scene.map_mask.shape[1]} map segments, {args.rollouts} rollouts")
    timed(model, scene, 2, True, device)  # warm-up
    cached, t_cache, mem_cache = timed(model, scene, args.rollouts, True, device)
    full, t_full, mem_full = timed(model, scene, args.rollouts, False, device)
    same = bool(torch.equal(cached.tokens, full.tokens))
    steps = args.rollouts * agents * 80
    print(f"kv cache:   {t_cache:8.2f} s  {steps / t_cache:10.0f} agent-steps/s  peak memory {mem_cache:8.0f} MB")
    print(f"recompute:  {t_full:8.2f} s  {steps / t_full:10.0f} agent-steps/s  peak memory {mem_full:8.0f} MB")
    print(f"same tokens with and without the cache: {same}")
    print(f"speedup {t_full / t_cache:.2f} agent_steps_per_s {steps / t_cache:.0f}")


if __name__ == "__main__":
    main()
