"""What the metrics give policies that need no model, on a data set: the logged future (log
replay, the ceiling), every agent standing still (stationary) and constant velocity. A learnt
policy's realism means something only beside these: on real WOMD scenes a simulation that never
moves scores close to RFT's figures, because WOSAC's metametric weighs collisions and off-road
heavily and a parked agent commits neither.

    python benchmarks/reference_policies.py --data runs/sft_rft_sft/data/real/report --rollouts 16
    python benchmarks/reference_policies.py --data '../shared/womd/real/*.tfrecord'

Prints one markdown table (fast WOSAC 2025 metrics, 95% bootstrap over the scenes or networks,
and the travel ratio: how far the agents go against the log).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smart_r1.data.dataset import iter_scenarios  # noqa: E402
from smart_r1.metrics import aggregate_metrics, compute_metrics_batch  # noqa: E402
from smart_r1.metrics.intervals import headline_intervals  # noqa: E402
from smart_r1.metrics.leaderboard import with_categories  # noqa: E402
from smart_r1.metrics.rollouts_io import constant_velocity_states, log_replay_states, stationary_states  # noqa: E402
from smart_r1.metrics.signals import travel_ratio  # noqa: E402
from smart_r1.metrics.tables import metrics_table  # noqa: E402

POLICIES = {"log replay": log_replay_states, "stationary": stationary_states,
            "constant velocity": constant_velocity_states}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="Parquet folder or TFRecord file / glob")
    p.add_argument("--rollouts", type=int, default=16, help="rollouts per scenario (all alike here)")
    p.add_argument("--max-scenarios", type=int, default=None)
    args = p.parse_args(argv)
    records = [r for r in iter_scenarios(args.data, args.max_scenarios) if r.sim_agent_mask.any()]
    rows = []
    for name, policy in POLICIES.items():
        states = [policy(r, args.rollouts) for r in records]
        scored = [{"scenario_id": r.scenario_id, **with_categories(m)}
                  for r, m in zip(records, compute_metrics_batch(records, states))]
        ratios = [x for x in (travel_ratio(r, s) for r, s in zip(records, states)) if x is not None]
        metrics = {**aggregate_metrics(scored), **headline_intervals(scored)}
        rows.append(((name, f"{np.mean(ratios):.2f}", len(records)), metrics))
    print(f"{args.data}: {len(records)} scenarios x {args.rollouts} rollouts")
    print(metrics_table(("policy",), rows, trailing=("travel ratio", "scenarios")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
