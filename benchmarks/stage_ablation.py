"""Closed-loop SFT variants from one checkpoint, several training seeds, scored per scenario.

In one process, no Ray: for each training seed, `--steps` updates of `--batch` training scenes
(the pipeline's catk_sft stage: CAT-K rollouts, `catk_sft_loss`, AdamW at a constant lr, the
pipeline's optimizer step), then every held-out scenario's fast WOSAC metrics from `--rollouts`
rollouts with top-k sampling under a fixed evaluation seed (the same for every variant, so
variants are compared on the same scenarios and the same random draws where they agree).
`--steps 0` scores the checkpoint itself. One JSON line per (variant, seed) is appended to
`--out` with the per-scenario records, for paired bootstrap intervals
(`python benchmarks/stage_ablation.py --report OUT`).

    python benchmarks/stage_ablation.py --ckpt runs/X/bc/model.pt --train runs/X/data/train \\
        --heldout runs/X/data/sumo_heldout --name catk_k5 --k 5 --seeds 0,1,2 --out ablation.jsonl
    python benchmarks/stage_ablation.py --report ablation.jsonl --baseline base
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smart_r1.data.dataset import iter_scenarios  # noqa: E402
from smart_r1.metrics import aggregate_metrics, compute_scenario_metrics  # noqa: E402
from smart_r1.metrics.intervals import paired_seed_difference, seed_bootstrap, shared_ids  # noqa: E402
from smart_r1.model.checkpoint import load_checkpoint  # noqa: E402
from smart_r1.rl.bc import bc_loss  # noqa: E402
from smart_r1.rl.catk import catk_sft_loss  # noqa: E402
from smart_r1.rl.optim import make_optimizer, optimizer_step  # noqa: E402
from smart_r1.rollout.closed_loop import rollout_records  # noqa: E402
from smart_r1.rollout.sampling import Sampler  # noqa: E402
from smart_r1.tokens.scene import build_scene, collate  # noqa: E402

FIELDS = ("metametric", "simulated_collision_rate", "simulated_offroad_rate", "min_average_displacement_error",
          "linear_speed_likelihood", "angular_speed_likelihood", "distance_to_nearest_object_likelihood")


def train(model, records, args, seed: int) -> dict:
    """`args.steps` updates of the variant on random batches drawn with `seed`."""
    agents = "all" if args.mode == "bc" else "sim"
    cache: dict[int, object] = {}
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer, _ = make_optimizer(model, args.lr, 0.0, max(args.steps, 1))
    anchor = copy.deepcopy(model).eval() if args.anchor_weight else None  # the checkpoint as loaded
    last = {}
    for step in range(args.steps):
        picked = rng.sample(range(len(records)), args.batch)
        for i in picked:
            if i not in cache:
                cache[i] = build_scene(records[i], model.vocab, agents=agents,
                                       max_agents=64 if agents == "all" else 128)
        batch = collate([cache[i] for i in picked])
        model.train()
        if args.mode == "bc":
            loss, last = bc_loss(model, batch, args.label_smoothing)
        else:
            loss, last = catk_sft_loss(model, batch, args.k, bc_weight=args.bc_weight,
                                       label_smoothing=args.label_smoothing, anchor=anchor,
                                       anchor_weight=args.anchor_weight)
        optimizer_step(model, optimizer, loss, 1.0)
    return last


def score(model, records, args) -> list[dict]:
    """Per-scenario fast WOSAC metrics under the fixed evaluation seed."""
    torch.manual_seed(args.eval_seed)
    model.eval()
    sampler = Sampler(top_k=args.top_k)
    rows = []
    for record in records:
        rollout = rollout_records(model, [record], args.rollouts, sampler)[0]
        m = compute_scenario_metrics(record, rollout.states)
        rows.append({"scenario_id": record.scenario_id, **{k: float(v) for k, v in m.items()}})
    return rows


def run(args) -> None:
    torch.set_num_threads(args.threads)
    train_records = [r for r in iter_scenarios(args.train) if r.sim_agent_mask.any()]
    held = [r for r in iter_scenarios(args.heldout, args.eval_scenarios) if r.sim_agent_mask.any()]
    for seed in [int(s) for s in args.seeds.split(",")]:
        t0 = time.perf_counter()
        model = load_checkpoint(args.ckpt)
        stats = train(model, train_records, args, seed) if args.steps else {}
        rows = score(model, held, args)
        summary = aggregate_metrics([{k: v for k, v in r.items() if k != "scenario_id"} for r in rows])
        line = {"name": args.name, "seed": seed, "steps": args.steps, "k": args.k, "lr": args.lr,
                "bc_weight": args.bc_weight, "anchor_weight": args.anchor_weight, "label_smoothing": args.label_smoothing, "mode": args.mode,
                "rollouts": args.rollouts, "eval_seed": args.eval_seed, "last_stats": stats,
                "summary": {k: summary[k] for k in FIELDS if k in summary}, "per_scenario": rows,
                "seconds": time.perf_counter() - t0}
        with open(args.out, "a") as f:
            f.write(json.dumps(line) + "\n")
        print(f"{args.name} seed {seed}: meta {summary['metametric']:.4f} collision "
              f"{summary['simulated_collision_rate']:.3f} off-road {summary['simulated_offroad_rate']:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if not args.steps:
            break  # the checkpoint itself: one row is enough


def report(args) -> None:
    """Each variant against the baseline: mean over seeds and the paired difference with a 95%
    interval (smart_r1.metrics.intervals: seeds, then the shared scenarios, resampled). A
    baseline scored once (the checkpoint itself) stands for every seed."""
    lines = [json.loads(x) for x in open(args.report)]
    names = list(dict.fromkeys(ln["name"] for ln in lines))
    base = [ln["per_scenario"] for ln in lines if ln["name"] == args.baseline]
    print("| variant | seeds | " + " | ".join(f"{f} (diff vs {args.baseline}, 95% CI)" for f in args.fields) + " |")
    print("|---|---|" + "---|" * len(args.fields))
    for name in names:
        runs = [ln["per_scenario"] for ln in lines if ln["name"] == name]
        mine = seed_bootstrap(runs, args.fields)
        diff = paired_seed_difference(base * len(runs) if len(base) == 1 else base, runs, args.fields)
        cells = [f"{mine[f].mean:.4f} ({diff[f].mean:+.4f} [{diff[f].lo:+.4f}, {diff[f].hi:+.4f}]"
                 f"{'*' if diff[f].lo > 0 or diff[f].hi < 0 else ''})" for f in args.fields]
        print(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    print(f"\n{len(shared_ids([r for ln in lines for r in [ln['per_scenario']]]))} shared scenarios; "
          "* = the interval excludes zero.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt")
    p.add_argument("--train")
    p.add_argument("--heldout")
    p.add_argument("--name", default="variant")
    p.add_argument("--mode", default="catk", choices=("catk", "bc"))
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--bc-weight", type=float, default=0.0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--anchor-weight", type=float, default=0.0,
                   help="weight of KL(checkpoint as loaded || policy) on the CAT-K states")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--eval-scenarios", type=int, default=1000)
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--eval-seed", type=int, default=12345)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="ablation.jsonl")
    p.add_argument("--report", default="", help="print the table of a finished --out file")
    p.add_argument("--baseline", default="base")
    p.add_argument("--fields", nargs="+", default=["metametric", "simulated_collision_rate", "simulated_offroad_rate"])
    args = p.parse_args()
    report(args) if args.report else run(args)


if __name__ == "__main__":
    main()
