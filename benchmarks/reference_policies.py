"""What the metrics give policies that need no model, on a data set: the logged future (log
replay, the ceiling), every agent standing still (stationary) and constant velocity. A learnt
policy's realism means something only beside these: on real WOMD scenes a simulation that never
moves scores close to RFT's figures, because WOSAC's metametric weighs collisions and off-road
heavily and a parked agent commits neither.

    python benchmarks/reference_policies.py --data runs/sft_rft_sft/data/real/report
    python benchmarks/reference_policies.py --data '../shared/womd/real/*.tfrecord'

Prints one markdown table (fast WOSAC 2025 metrics, 95% bootstrap over the scenes or networks,
and the travel ratio: how far the agents go against the log).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smart_r1.data.dataset import iter_scenarios  # noqa: E402
from smart_r1.metrics.intervals import headline_intervals  # noqa: E402
from smart_r1.metrics.references import reference_scores, summary  # noqa: E402
from smart_r1.metrics.tables import metrics_table  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="Parquet folder or TFRecord file / glob")
    p.add_argument("--max-scenarios", type=int, default=None)
    args = p.parse_args(argv)
    scores = reference_scores(list(iter_scenarios(args.data, args.max_scenarios)))
    rows = []
    for name, scored in scores.items():
        m = {**summary(scored), **headline_intervals(scored)}
        rows.append(((name, f"{m['travel_ratio']:.2f}", m["scenarios"]), m))
    print(f"{args.data}: the policies are deterministic (one rollout each)")
    print(metrics_table(("policy",), rows, trailing=("travel ratio", "scenarios")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
