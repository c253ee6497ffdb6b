"""Data pipeline throughput: SUMO generation, TFRecord -> Parquet preprocessing with 1 and 2 Ray
workers, and loading scenarios back from Parquet.

Targets on the 2-core dev machine: generation >= 20 scenarios/s, loading >= 500 scenarios/s.
The machine's load average is printed with the figures: these machines are shared, and a busy
neighbour slows every figure here.

    python benchmarks/bench_data.py [--scenarios 300] [--seed 0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path


def _load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def bench_generation(out: Path, scenarios: int, seed: int) -> dict:
    from smart_r1.data.sumo import make_dataset

    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    summary = make_dataset(out, scenarios, seed=seed, scenarios_per_file=50)
    seconds = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu_before
    # CPU time (this process, the worker processes and their SUMO runs) shows what the figure
    # would be on two idle cores when neighbours share the machine.
    return {"scenarios": summary["scenarios"], "networks": summary["networks"],
            "seconds": round(seconds, 2), "scenarios_per_second": round(summary["scenarios"] / seconds, 1),
            "cpu_seconds": round(cpu, 1),
            "scenarios_per_cpu_second": round(summary["scenarios"] / cpu, 1),
            "mean_agents": summary["mean_agents"], "load_average": _load_average()}


def _cpu_seconds() -> float:
    """User + system CPU of this process and of its finished (waited-for) descendants."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def bench_preprocess(tfrecords: Path, out: Path, workers: int) -> dict:
    """Preprocessing on an already started Ray with `workers` CPUs (start-up not timed)."""
    import ray

    from smart_r1.data.preprocess import preprocess

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        started = time.perf_counter()
        report = preprocess(f"{tfrecords}/*.tfrecord", out, num_workers=workers, verbose=False)
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    return {"workers": workers, "scenarios": report["scenarios"], "files": report["files"],
            "seconds": round(seconds, 2), "scenarios_per_second": round(report["scenarios"] / seconds, 1),
            "load_average": _load_average()}


def bench_loading(parquet: Path, repeats: int = 3) -> dict:
    from smart_r1.data.dataset import iter_scenarios

    best, best_cpu, count = float("inf"), float("inf"), 0
    for _ in range(repeats):
        started, cpu = time.perf_counter(), time.process_time()
        count = sum(1 for _ in iter_scenarios(parquet))
        best = min(best, time.perf_counter() - started)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return {"scenarios": count, "seconds": round(best, 3), "scenarios_per_second": round(count / best, 1),
            "scenarios_per_cpu_second": round(count / best_cpu, 1), "load_average": _load_average()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", default=None, help="write here and keep the data (default: a temp dir)")
    args = parser.parse_args()

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        results = {"generation": bench_generation(root / "tfrecord", args.scenarios, args.seed)}
        print("generation", json.dumps(results["generation"]), flush=True)
        for workers in (1, 2):
            key = f"preprocess_{workers}_worker{'s' if workers > 1 else ''}"
            results[key] = bench_preprocess(root / "tfrecord", root / f"parquet{workers}", workers)
            print(key, json.dumps(results[key]), flush=True)
        results["loading"] = bench_loading(root / "parquet1")
        print("loading", json.dumps(results["loading"]), flush=True)
        print(f"generation {results['generation']['scenarios_per_second']} scen/s (target 20; "
              f"{results['generation']['scenarios_per_cpu_second']} per CPU-second), "
              f"preprocess {results['preprocess_1_worker']['scenarios_per_second']} / "
              f"{results['preprocess_2_workers']['scenarios_per_second']} scen/s (1 / 2 workers), "
              f"loading {results['loading']['scenarios_per_second']} scen/s (target 500)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
