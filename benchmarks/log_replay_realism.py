"""Realism of the SUMO-generated data by the official WOSAC 2025 evaluator: log replay (the logged
future as the only rollout) must neither leave the road nor crash, so its simulated off-road and
collision rates should be near zero (target: each below 2%).

Prints the per-scenario rates of any scenario with a collision or off-road, then the mean over
scenarios (the official aggregation) and the rate pooled over all evaluated agents.

    python benchmarks/log_replay_realism.py [--scenarios 40] [--seed 0] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from smart_r1.metrics.official import reexec_with_malloc_env  # noqa: E402

reexec_with_malloc_env()  # the official evaluator runs ~2x faster with glibc's MALLOC_* set

import glob  # noqa: E402

import numpy as np  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2,
                        help="Ray CPUs for the official evaluator; 0 runs it in this process")
    parser.add_argument("--data", default=None, help="existing TFRecords (glob) instead of generating")
    args = parser.parse_args()

    from smart_r1.data.sumo import make_dataset
    from smart_r1.data.womd import read_scenarios
    from smart_r1.metrics.official import official_metrics_parallel, official_scenario_metrics
    from smart_r1.metrics.rollouts_io import log_replay_states, states_to_scenario_rollouts

    pattern = args.data
    if pattern is None:
        out = tempfile.mkdtemp(prefix="log_replay_")
        make_dataset(out, args.scenarios, seed=args.seed)
        pattern = f"{out}/*.tfrecord"
    records = [r for path in sorted(glob.glob(pattern)) for r in read_scenarios(path)][: args.scenarios]
    pairs = [(r, states_to_scenario_rollouts(r, log_replay_states(r, num_rollouts=1))) for r in records]
    started = time.perf_counter()
    results = None
    if args.workers > 0:
        import ray

        try:
            results = official_metrics_parallel(pairs, num_workers=args.workers)
        except ray.exceptions.RayError as e:  # shared dev machines: a neighbour's `ray stop`
            print(f"Ray failed ({type(e).__name__}); evaluating in this process instead", flush=True)
            ray.shutdown()
    if results is None:
        results = [official_scenario_metrics(r, rollouts) for r, rollouts in pairs]
    seconds = time.perf_counter() - started

    evaluated = np.array([len(set(r.tracks_to_predict.tolist()) | {r.sdc_index}) for r in records])
    collision = np.array([m["simulated_collision_rate"] for m in results])
    offroad = np.array([m["simulated_offroad_rate"] for m in results])
    for r, c, o in zip(records, collision, offroad):
        if c > 0 or o > 0:
            print(f"{r.scenario_id}: collision {c:.3f} offroad {o:.3f}")
    summary = {
        "scenarios": len(records),
        "evaluated_agents": int(evaluated.sum()),
        "collision_rate_mean": round(float(collision.mean()), 4),
        "offroad_rate_mean": round(float(offroad.mean()), 4),
        "collision_rate_pooled": round(float((collision * evaluated).sum() / evaluated.sum()), 4),
        "offroad_rate_pooled": round(float((offroad * evaluated).sum() / evaluated.sum()), 4),
        "metametric_mean": round(float(np.mean([m["metametric"] for m in results])), 4),
        "official_seconds": round(seconds, 1),
    }
    print(json.dumps(summary))
    ok = summary["collision_rate_mean"] < 0.02 and summary["offroad_rate_mean"] < 0.02
    print("PASS" if ok else "FAIL", "(target: both rates below 0.02)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
