"""Closed-loop rollouts of several scenarios in one batch against one scenario at a time (what a
rollout actor does with `ray.scenarios_per_rollout_batch`), on CPU or GPU.

Every scene gets `--rollouts` sampled rollouts (top-k 8), 16 tokens each; scenes are batched in
the order given, `size` at a time (agents and map segments padded to the batch's largest, as the
actor does). Reports rollouts per second of each batch size, the best of `--repeats` turns (the
sizes take turns, so a load that changes meanwhile hits all alike), and peak memory. Model: an
untrained SMART-tiny of `--preset` (rollout cost does not depend on the weights).

    python benchmarks/bench_rollout_batch.py --data PARQUET_FOLDER [--womd TFRECORD] [--batch 1,4,8]
    python benchmarks/bench_rollout_batch.py ... --save-scenes scenes.pt   # tokenise here, time elsewhere
    python benchmarks/bench_rollout_batch.py --load-scenes scenes.pt       # needs torch and this code only

Last line: `rollouts_per_s_batch<size> <value> ...`.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smart_r1.rollout.closed_loop import closed_loop  # noqa: E402
from smart_r1.rollout.sampling import Sampler  # noqa: E402
from smart_r1.tokens.scene import collate  # noqa: E402


def make_scenes(args) -> dict:
    from smart_r1.data.dataset import iter_scenarios
    from smart_r1.model.config import ModelConfig
    from smart_r1.model.smart_tiny import SmartTiny
    from smart_r1.tokens.motion_vocab import build_vocab
    from smart_r1.tokens.scene import build_scene

    records = list(iter_scenarios(args.data, args.scenes))
    if args.womd:
        records.insert(len(records) // 2, next(iter_scenarios(args.womd)))
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset)
    model = SmartTiny(cfg, build_vocab(records, size=cfg.vocab_size, iters=4)).eval()
    return {"model": model, "scenes": [build_scene(r, model.vocab, agents="sim") for r in records]}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(model, scenes: list, size: int, rollouts: int, device: torch.device) -> float:
    """Seconds to roll out every scene, `size` scenes per closed-loop batch."""
    sampler = Sampler(top_k=8, generator=torch.Generator(device=device).manual_seed(0))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(0, len(scenes), size):
        group = scenes[i:i + size]
        out = closed_loop(model, group[0] if len(group) == 1 else collate(group), rollouts, sampler)
        out.poses.cpu()  # the actor scores them on the CPU
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="", help="Parquet folder or TFRecord glob of scenarios")
    p.add_argument("--womd", default="", help="a WOMD TFRecord whose first scenario joins them (mid-way)")
    p.add_argument("--scenes", type=int, default=8, help="scenarios read from --data")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--batch", default="1,4", help="batch sizes (scenes per closed-loop batch) to compare")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (a 1-CPU rollout actor: 1)")
    p.add_argument("--save-scenes", default="")
    p.add_argument("--load-scenes", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kit = torch.load(args.load_scenes, weights_only=False) if args.load_scenes else make_scenes(args)
    if args.save_scenes:
        torch.save(kit, args.save_scenes)
        print(f"saved {len(kit['scenes'])} scenes and the model to {args.save_scenes}")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, scenes = kit["model"].to(device).eval(), [s.to(device) for s in kit["scenes"]]
    agents = [int(s.sim_mask.sum()) for s in scenes]
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{model.num_parameters():,} parameters, {len(scenes)} scenes of {agents} sim agents, {args.rollouts} rollouts")
    sizes = [int(x) for x in args.batch.split(",")]
    run(model, scenes[:2], 2, 2, device)  # warm-up
    best: dict[int, float] = {}
    memory: dict[int, float] = {}
    for _ in range(args.repeats):
        for size in sizes:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = run(model, scenes, size, args.rollouts, device)
            best[size] = max(best.get(size, 0.0), len(scenes) * args.rollouts / seconds)
            memory[size] = peak_memory_mb(device)
    for size in sizes:
        print(f"{size} scenes per batch: {best[size]:8.2f} rollouts/s  ({best[size] / best[sizes[0]]:.2f}x)  "
              f"peak memory {memory[size]:.0f} MB")
    print(" ".join(f"rollouts_per_s_batch{k} {v:.2f}" for k, v in best.items()))


if __name__ == "__main__":
    main()
