"""Realism of a BC checkpoint against a constant-velocity baseline, with the fast WOSAC metrics.

For each held-out scenario: `--rollouts` closed-loop rollouts of SMART-tiny, and the same number of
constant-velocity rollouts (every sim agent keeps its current velocity and heading). Prints the
dataset-level metametric (and the other fields) of both as JSON; with `--official`, also the
official evaluator's metametric of the model's rollouts on the shared real scenario.

    python benchmarks/eval_bc.py --checkpoint CKPT --data HELD_OUT_DIR [--scenarios 50] [--rollouts 32]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from smart_r1.data.dataset import iter_scenarios
from smart_r1.metrics import aggregate_metrics, compute_scenario_metrics
from smart_r1.model.checkpoint import load_checkpoint
from smart_r1.data.dataset import data_source
from smart_r1.rollout.closed_loop import rollout_records
from smart_r1.rollout.sampling import Sampler
from smart_r1.metrics.rollouts_io import constant_velocity_states

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "womd" / "motion_data_one_scenario.tfrecord"


def evaluate(model, records, rollouts: int, sampler) -> tuple[dict, dict]:
    ours, baseline = [], []
    for record in records:
        if not record.sim_agent_mask.any():
            continue
        rollout = rollout_records(model, [record], rollouts, sampler)[0]
        ours.append(compute_scenario_metrics(record, rollout.states))
        baseline.append(compute_scenario_metrics(record, constant_velocity_states(record, rollouts)))
    return aggregate_metrics(ours), aggregate_metrics(baseline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="held-out scenarios (folder or TFRecord glob)")
    parser.add_argument("--scenarios", type=int, default=50)
    parser.add_argument("--rollouts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--official", action="store_true", help="also run the official evaluator on the shared scenario")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_checkpoint(args.checkpoint)
    sampler = Sampler(top_k=args.top_k, temperature=args.temperature)
    start = time.perf_counter()
    held_out = list(iter_scenarios(data_source(args.data), args.scenarios))
    ours, baseline = evaluate(model, held_out, args.rollouts, sampler)
    report = {"held_out_scenarios": len(held_out), "rollouts": args.rollouts,
              "smart_tiny": ours, "constant_velocity": baseline}
    if SHARED.exists():
        shared = list(iter_scenarios(str(SHARED)))
        s_ours, s_base = evaluate(model, shared, args.rollouts, sampler)
        report["shared_real_scenario"] = {"smart_tiny": s_ours, "constant_velocity": s_base}
        if args.official:
            from smart_r1.metrics.official import official_scenario_metrics
            from smart_r1.metrics.rollouts_io import states_to_scenario_rollouts

            rollout = rollout_records(model, shared, args.rollouts, sampler)[0]
            official = official_scenario_metrics(shared[0], states_to_scenario_rollouts(shared[0], rollout.states))
            report["shared_real_scenario"]["smart_tiny_official"] = official
    report["seconds"] = time.perf_counter() - start
    print(json.dumps(report, indent=2))
    print(f"metametric smart_tiny {ours['metametric']:.4f} constant_velocity {baseline['metametric']:.4f}")


if __name__ == "__main__":
    main()
