"""Memory per process against the dataset's size: the pipeline on N and on 10N generated SUMO
training scenarios, the peak resident memory of its learner and of its rollout actor each time.

For each size, two fresh processes, each with a local Ray of its own (2 CPUs):
    prepare   the pipeline's own data steps: generate the SUMO set and preprocess it to Parquet
              shards, build the vocabulary and init.pt, tokenise the training shards into token
              shards (`pipeline.prepare_data`, `prepare_model`, `prepare_tokens`)
    train     `run_pipeline` on the same storage root: it finds the data, init.pt and the token
              shards there and runs one short BC epoch (N / 4 steps of 4 scenes at both sizes: a
              whole pass over N, a tenth of 10N, streamed from row groups the learner picks in a
              shuffled order) and one RFT step (scenarios handed to the rollout actor), each
              stage scored on 4 held-out scenarios
The BC epoch has the same number of steps at both sizes because a learner's peak is mostly the
activations of its largest padded batch (agents x map segments, bounded by build_scene's 64 x
2048): a whole pass over 10N draws more batches, so a larger largest one (BENCHMARKS.md,
"Memory against dataset size", has that run too).
Training runs in its own Ray, so no Ray worker process that tokenised or preprocessed is reused
for the learner or the actor (their peak would include that work).

Peaks are VmHWM (ru_maxrss) read inside the processes: the learners log `peak_rss_mb` with every
epoch / RL step (`train_log.jsonl` of bc and rft; the learner figure is the larger), the pipeline
writes its rollout actors' in `rollout_workers.json`. The last line printed is

    peak_rss_ratio_learner X peak_rss_ratio_actor Y        (10N over N; issue 16 asks <= 1.3)

    python benchmarks/bench_scale.py [--n 100] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


BATCH = 4  # BC scenarios per step


def config_dict(out_dir: Path, n: int, bc_steps: int) -> dict:
    return {
        "out_dir": str(out_dir), "seed": 0,
        "data": {"embedded_train_scenarios": n, "embedded_heldout_scenarios": 4, "real": ""},
        "model": {"preset": "test", "vocab_size": 64},
        "ray": {"num_rollout_workers": 1, "cpus_per_rollout_worker": 1, "num_learners": 1, "cpus_per_learner": 1},
        "eval": {"num_rollouts": 2, "max_scenarios": 4},
        # a short BC epoch: the same number of steps at both sizes (a whole pass over N)
        "stages": [{"name": "bc", "kind": "bc", "epochs": 1, "batch_scenarios": BATCH, "steps_per_epoch": bc_steps},
                   {"name": "rft", "kind": "mpo", "steps": 1, "num_rollouts": 2, "scenarios_per_step": 4}],
    }


def phase(name: str, config_path: Path) -> None:
    """Run one phase in this process (the parent runs each in a fresh one)."""
    from smart_r1.config import load_config
    from smart_r1.distributed.pipeline import prepare_data, prepare_model, prepare_tokens, run_pipeline
    from smart_r1.ray_runtime import ensure_ray
    from smart_r1.storage import root

    config = load_config(config_path)
    ensure_ray(num_cpus=2)
    if name == "train":
        run_pipeline(config)
        return
    out = root(config.out_dir)
    datasets = prepare_data(config, out)
    prepare_tokens(config, datasets, out, prepare_model(config, datasets, out))


def run_phase(name: str, config_path: Path, log: Path) -> float:
    """Seconds of one phase run in a fresh Python process; its output goes to `log`."""
    started = time.perf_counter()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{config_path.parent / 'mlflow.db'}"}  # not the cwd's
    with log.open("a") as f:
        proc = subprocess.run([sys.executable, __file__, "--phase", name, "--config", str(config_path)],
                              stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - started


def peaks(out_dir: Path) -> dict:
    """Peak RSS (MB) of the learners (bc, rft: the larger) and of the rollout actors."""
    learner = max(json.loads(line)["peak_rss_mb"] for stage in ("bc", "rft")
                  for line in (out_dir / stage / "train_log.jsonl").read_text().splitlines())
    actor = max(json.loads((out_dir / "rollout_workers.json").read_text())["peak_rss_mb"])
    return {"learner_mb": round(learner, 1), "actor_mb": round(actor, 1)}


def measure(n: int, out: Path, bc_steps: int) -> dict:
    run_dir = out / f"n{n}"
    config_path = out / f"n{n}.yaml"
    config_path.write_text(yaml.safe_dump(config_dict(run_dir, n, bc_steps)))
    log = out / f"n{n}.log"
    prepare_s = run_phase("prepare", config_path, log)
    train_s = run_phase("train", config_path, log)
    bc = json.loads((run_dir / "bc" / "train_log.jsonl").read_text().splitlines()[-1])
    row = {"scenarios": n, "prepare_s": round(prepare_s, 1), "train_s": round(train_s, 1),
           "bc_loss": round(bc["loss"], 3), **peaks(run_dir), "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="the smaller training set (the larger is 10 x)")
    parser.add_argument("--out", default="", help="folder for the runs and logs (default: a temporary one)")
    parser.add_argument("--phase", choices=("prepare", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        phase(args.phase, Path(args.config))
        return
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_scale_"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"runs and logs in {out}", flush=True)
    bc_steps = math.ceil(args.n / BATCH)  # one pass over the smaller set
    small, large = measure(args.n, out, bc_steps), measure(10 * args.n, out, bc_steps)
    print(f"peak_rss_ratio_learner {large['learner_mb'] / small['learner_mb']:.3f} "
          f"peak_rss_ratio_actor {large['actor_mb'] / small['actor_mb']:.3f}", flush=True)


if __name__ == "__main__":
    main()
