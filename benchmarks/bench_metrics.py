"""WOSAC 2025 metrics: the PyTorch implementation against Waymo's official evaluator, same run.

1. The shared WOMD scenario with the official test submission (32 rollouts): both
   implementations, their wall times, the ratio, and the largest absolute deviation over all
   SimAgentMetrics fields.
2. Throughput over a batch of 16 scenarios (copies of the shared one, each with its own noisy
   32 rollouts): one padded batched call, and 16 single-scenario calls.

The official evaluator runs in this process, with the glibc allocator variables set before the
process starts (re-executing itself when they are missing), as the Makefile does for `make bench`.
The fast path is timed as the median of several runs after one warm-up, from `ScenarioRecord` and
states to the metrics dict (context building included), eagerly and with the hot kernels
compiled (`smart_r1.metrics.enable_compile`; the one-off compile happens in the warm-up and is
reported). The throughput and the last line, `speedup <ratio> max_abs_dev <value>`, use the
compiled path unless `--no-compile`.

    python benchmarks/bench_metrics.py [--threads N] [--repeats 5] [--no-compile]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from smart_r1.metrics.official import reexec_with_malloc_env  # noqa: E402

reexec_with_malloc_env()  # the official evaluator runs ~2x faster with glibc's MALLOC_* set

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCENARIO = REPO.parent / "shared" / "womd" / "motion_data_one_scenario.tfrecord"


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, lazy imports, config parsing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for the fast path (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the fast path")
    parser.add_argument("--batch", type=int, default=16, help="scenarios in the throughput batch")
    parser.add_argument("--no-compile", action="store_true", help="eager PyTorch only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from smart_r1.data.womd import read_scenarios
    from smart_r1.metrics import METRIC_FIELDS, compute_metrics_batch, compute_scenario_metrics, enable_compile
    from smart_r1.metrics.official import official_scenario_metrics
    from smart_r1.metrics.rollouts_io import read_rollouts, scenario_rollouts_to_states

    if not SCENARIO.exists():
        print(f"missing {SCENARIO}", file=sys.stderr)
        return 1
    from waymo_open_dataset.protos import scenario_pb2

    submission = (Path(scenario_pb2.__file__).resolve().parents[1] / "utils" / "sim_agents" / "testdata"
                  / "test_submission.binproto")
    record = next(read_scenarios(SCENARIO))
    rollouts = read_rollouts(submission, record.scenario_id)
    states = torch.as_tensor(scenario_rollouts_to_states(record, rollouts), dtype=torch.float32)
    print(f"scenario {record.scenario_id}: {record.sim_agent_mask.sum()} sim agents, "
          f"{states.shape[0]} rollouts; torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")

    run = lambda: compute_scenario_metrics(record, states)  # noqa: E731
    fast_seconds = _median_seconds(run, args.repeats)
    fast = run()
    print(f"fast, eager PyTorch ({states.device}): {fast_seconds * 1e3:.1f} ms per scenario "
          f"(median of {args.repeats})")
    if not args.no_compile:
        enable_compile()
        start = time.perf_counter()
        run()
        print(f"compiling the hot kernels (one-off, cached on disk): {time.perf_counter() - start:.1f} s")
        fast_seconds = _median_seconds(run, args.repeats)
        fast = run()
        print(f"fast, compiled kernels: {fast_seconds * 1e3:.1f} ms per scenario (median of {args.repeats})")

    start = time.perf_counter()
    official = official_scenario_metrics(record, rollouts)
    official_seconds = time.perf_counter() - start
    print(f"official (TensorFlow): {official_seconds:.1f} s")

    deviation = {k: abs(fast[k] - official[k]) for k in METRIC_FIELDS}
    worst = max(deviation, key=deviation.get)
    for k in METRIC_FIELDS:
        print(f"  {k:40s} official {official[k]:.6f}  fast {fast[k]:.6f}  |dev| {deviation[k]:.2e}")

    rng = np.random.default_rng(0)
    batch_states = [states + torch.as_tensor(np.cumsum(rng.normal(0, 0.05, states.shape), axis=2),
                                             dtype=torch.float32) for _ in range(args.batch)]
    batch_records = [record] * args.batch
    batched = _median_seconds(lambda: compute_metrics_batch(batch_records, batch_states), max(1, args.repeats // 2))
    serial = _median_seconds(lambda: [compute_scenario_metrics(r, s) for r, s in zip(batch_records, batch_states)], 1)
    print(f"throughput, {args.batch} scenarios x {states.shape[0]} rollouts: batched {args.batch / batched:.2f} "
          f"scenarios/s ({batched:.2f} s), one by one {args.batch / serial:.2f} scenarios/s ({serial:.2f} s), "
          f"official {1 / official_seconds:.4f} scenarios/s")

    ratio = official_seconds / fast_seconds
    print(f"largest deviation: {worst} {deviation[worst]:.2e}")
    print(f"speedup {ratio:.0f} max_abs_dev {deviation[worst]:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
