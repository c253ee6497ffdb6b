"""Thread placement of the RFT stage on a small machine, measured: the learner's torch threads, and
whether the rollout workers or the learner run the frozen reference (issue 18).

    python benchmarks/bench_rft_layout.py [--scenarios 16] [--steps 5] [--preset cpu]

The real RFT stage (a Ray Train learner of 1 CPU and 2 rollout actors of 0.5 CPU each with 1
thread: the pipelines' layout on 2 cores) runs `--steps` RL steps of 4 scenarios x 8 rollouts for
each layout; Ray is restarted between layouts (the reference switch is the learner job's
`reference_in_workers`). Reports, over steps 2.. (step 1 waits for the first batch), the mean wall
time per RL step, the learner's update and its wait for rollouts. Last line:
`best <layout> step_s <seconds>`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYOUTS = {  # name -> (learner threads, the workers compute log pi_ref)
    "threads2_ref_learner": (2, False),
    "threads2_ref_workers": (2, True),
    "threads1_ref_learner": (1, False),
    "threads1_ref_workers": (1, True),
}


def run_layout(name: str, threads: int, ref_in_workers: bool, tmp: Path, checkpoint: str, datasets: dict,
               args) -> dict:
    import ray

    from smart_r1.config import MPOStage, RayConfig, SamplingConfig
    from smart_r1.distributed.learner import run_learner
    from smart_r1.distributed.rollout_worker import start_workers
    from smart_r1.distributed.worker_kit import LearnerJob
    from smart_r1.ray_runtime import ensure_ray

    ray.shutdown()
    ensure_ray(num_cpus=2)
    stage = MPOStage(name=name, steps=args.steps, num_rollouts=8, scenarios_per_step=4, lr=1e-4,
                     alpha=0.6, sampling=SamplingConfig(top_k=8))
    workers = start_workers(checkpoint, datasets, 2, cpus=0.5, gpus=0)
    job = LearnerJob(stage=stage, stage_dir=str(tmp / name), init_checkpoint=checkpoint, datasets=datasets,
                     ref_checkpoint=checkpoint, rollout_workers=workers, threads=threads,
                     reference_in_workers=ref_in_workers)
    start = time.perf_counter()
    run_learner(job, RayConfig(num_learners=1, cpus_per_learner=1), str(tmp / "ray"))
    seconds = time.perf_counter() - start
    for w in workers:
        ray.kill(w)
    rows = [json.loads(line) for line in (tmp / name / "train_log.jsonl").read_text().splitlines()][1:]
    mean = lambda key: sum(r[key] for r in rows) / len(rows)
    phases = ("time_rollout_s", "time_adv_s", "time_update_s", "time_sync_s")
    return {"step_s": sum(mean(k) for k in phases), "update_s": mean("time_update_s"),
            "wait_s": mean("time_rollout_s"), "worker_reference_s": mean("worker_reference_s")
            if "worker_reference_s" in rows[0] else 0.0, "stage_s": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenarios", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    args = p.parse_args()

    from smart_r1.config import DataConfig, ModelSection, PipelineConfig
    from smart_r1.distributed.pipeline import prepare_data, prepare_model

    tmp = Path(tempfile.mkdtemp(prefix="bench_rft_layout_"))
    config = PipelineConfig(out_dir=str(tmp), data=DataConfig(embedded_train_scenarios=args.scenarios,
                                                              embedded_heldout_scenarios=2, real=""),
                            model=ModelSection(preset=args.preset, vocab_size=1024))
    datasets = prepare_data(config, tmp)
    checkpoint = prepare_model(config, datasets, tmp)
    results = {}
    for name in args.layouts.split(","):
        threads, ref_in_workers = LAYOUTS[name]
        results[name] = r = run_layout(name, threads, ref_in_workers, tmp, checkpoint, datasets, args)
        print(f"{name:22s} step {r['step_s']:6.2f} s  update {r['update_s']:6.2f} s  wait for rollouts "
              f"{r['wait_s']:5.2f} s  workers' reference {r['worker_reference_s']:5.2f} s/scenario  "
              f"(stage {r['stage_s']:.0f} s)", flush=True)
    best = min(results, key=lambda n: results[n]["step_s"])
    print(f"best {best} step_s {results[best]['step_s']:.2f}")


if __name__ == "__main__":
    main()
