"""RL on Ray: rollouts per second with 1 and 2 rollout actors (scaling efficiency), the learner's
idle fraction and the weight-sync time per update.

    python benchmarks/bench_rl.py [--scenarios 16] [--rollouts 8] [--preset cpu] [--steps 6]
    python benchmarks/bench_rl.py --batching 1,4 [--scenarios 8]   # scenarios per closed-loop batch only
    python benchmarks/bench_rl.py --preset default --rollouts-only [--actor-gpus 0.25 --scenes-per-batch 4]
                                       # actors' rollouts/s only; on a GPU node, actors on GPU shares

Data: SUMO scenarios generated into a temporary folder (seed 0). Model: an untrained SMART-tiny of
the given preset (rollout cost does not depend on the weights). The MPO part runs the real RFT
stage (Ray Train learner + rollout actors) and reads its per-step phase timings.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rollouts_per_second(checkpoint: str, datasets: dict, num_actors: int, scenarios: int, rollouts: int,
                        gpus: float = 0.0, scenes_per_batch: int = 1) -> float:
    import ray

    from smart_r1.distributed.rollout_tasks import split
    from smart_r1.distributed.rollout_worker import RolloutSpec, start_workers

    workers = start_workers(checkpoint, datasets, num_actors, cpus=1, gpus=gpus)
    spec = RolloutSpec(num_rollouts=rollouts, scenes_per_batch=scenes_per_batch)
    warm = [w.rollout.remote(0, [], "train", [0], spec) for w in workers]  # load data, build scenes
    ray.get(warm)
    indices = list(range(scenarios))
    start = time.perf_counter()
    results = ray.get([w.rollout.remote(0, [], "train", s, spec) for w, s in zip(workers, split(indices, num_actors))])
    seconds = time.perf_counter() - start
    for w in workers:
        ray.kill(w)
    done = sum(1 for part in results for r in part if hasattr(r, "tokens"))
    return done * rollouts / seconds


def batching_speed(checkpoint: str, datasets: dict, scenarios: int, rollouts: int, sizes: list[int],
                   repeats: int) -> dict[int, float]:
    """Rollouts per second (sampled and scored into experience) of a rollout actor's own code, run
    in this process on one thread, `size` scenarios per closed-loop batch. The sizes take turns
    `repeats` times and the best of each is kept, so a load that changes meanwhile hits all alike."""
    from smart_r1.distributed.rollout_worker import RolloutSpec, RolloutWorker
    from smart_r1.model.checkpoint import checkpoint_bytes

    worker = RolloutWorker(checkpoint_bytes(checkpoint), datasets, threads=1)
    indices = list(range(scenarios))
    worker.rollout(0, [], "train", indices, RolloutSpec(num_rollouts=1))  # read and tokenise once (cached)
    best: dict[int, float] = {}
    for _ in range(repeats):
        for size in sizes:
            start = time.perf_counter()
            out = worker.rollout(0, [], "train", indices, RolloutSpec(num_rollouts=rollouts, scenes_per_batch=size))
            seconds = time.perf_counter() - start
            assert all(hasattr(r, "tokens") for r in out), [r for r in out if not hasattr(r, "tokens")]
            best[size] = max(best.get(size, 0.0), scenarios * rollouts / seconds)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenarios", type=int, default=16)
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batching", default="", help="only this: scenarios per closed-loop batch to compare, e.g. 1,4")
    p.add_argument("--repeats", type=int, default=2, help="--batching: turns of each size (best kept)")
    p.add_argument("--rollouts-only", action="store_true", help="only the actors' rollouts/s (no MPO stage)")
    p.add_argument("--actor-gpus", type=float, default=0.0, help="GPU share of each rollout actor (0: CPU actors)")
    p.add_argument("--scenes-per-batch", type=int, default=1, help="scenarios per closed-loop batch in an actor")
    args = p.parse_args()

    from smart_r1.config import DataConfig, ModelSection, MPOStage, PipelineConfig, RayConfig
    from smart_r1.distributed.learner import run_learner
    from smart_r1.distributed.worker_kit import LearnerJob
    from smart_r1.distributed.pipeline import prepare_data, prepare_model
    from smart_r1.ray_runtime import ensure_ray
    from smart_r1.distributed.rollout_worker import start_workers

    tmp = Path(tempfile.mkdtemp(prefix="bench_rl_"))
    config = PipelineConfig(out_dir=str(tmp), data=DataConfig(embedded_train_scenarios=args.scenarios,
                                                              embedded_heldout_scenarios=2, real=""),
                            model=ModelSection(preset=args.preset, vocab_size=1024))
    datasets = prepare_data(config, tmp)
    checkpoint = prepare_model(config, datasets, tmp)
    if args.batching:
        sizes = [int(x) for x in args.batching.split(",")]
        speed = batching_speed(checkpoint, datasets, args.scenarios, args.rollouts, sizes, args.repeats)
        print("  ".join(f"scenes_per_batch {k}: {v:.2f} rollouts/s" for k, v in speed.items()))
        print(" ".join(f"rollouts_per_s_batch{k} {v:.2f}" for k, v in speed.items())
              + f" ratio {speed[sizes[-1]] / speed[sizes[0]]:.2f}")
        return
    ensure_ray(num_cpus=2)

    speed = dict(gpus=args.actor_gpus, scenes_per_batch=args.scenes_per_batch)
    one = rollouts_per_second(checkpoint, datasets, 1, args.scenarios, args.rollouts, **speed)
    two = rollouts_per_second(checkpoint, datasets, 2, args.scenarios, args.rollouts, **speed)
    efficiency = two / (2 * one)
    print(f"rollouts/s  1 actor {one:.2f}  2 actors {two:.2f}  scaling efficiency {efficiency:.2f} "
          f"({args.preset} preset, 1 CPU{f' and {args.actor_gpus:g} GPU' if args.actor_gpus else ''} per actor, "
          f"{args.scenes_per_batch} scenarios per closed-loop batch)")
    if args.rollouts_only:
        print(f"rollouts_per_s_1 {one:.2f} rollouts_per_s_2 {two:.2f} scaling {efficiency:.2f}")
        return

    stage = MPOStage(name="rft", steps=args.steps, num_rollouts=args.rollouts,
                        scenarios_per_step=4, lr=1e-4)
    # 2 x 0.5 CPU + a 1-CPU learner: the RFT stage's layout on 2 cores (3 CPUs would never schedule)
    workers = start_workers(checkpoint, datasets, 2, cpus=0.5, gpus=0)
    job = LearnerJob(stage=stage, stage_dir=str(tmp / "rft"), init_checkpoint=checkpoint, datasets=datasets,
                     ref_checkpoint=checkpoint, rollout_workers=workers)
    run_learner(job, RayConfig(num_learners=1, cpus_per_learner=1), str(tmp / "ray"))
    rows = [json.loads(line) for line in (tmp / "rft" / "train_log.jsonl").read_text().splitlines()][1:]
    phases = ("time_rollout_s", "time_adv_s", "time_update_s", "time_sync_s")
    total = sum(r[k] for r in rows for k in phases)
    idle = sum(r["time_rollout_s"] for r in rows) / total
    sync_ms = 1000 * sum(r["time_sync_s"] for r in rows) / len(rows)
    print(f"MPO steps 2..{args.steps} (step 1 waits for the first batch): learner idle fraction {idle:.2f}, "
          f"weight sync {sync_ms:.1f} ms/update, update {sum(r['time_update_s'] for r in rows) / len(rows):.2f} s/step")
    print(f"rollouts_per_s_1 {one:.2f} rollouts_per_s_2 {two:.2f} scaling {efficiency:.2f} "
          f"learner_idle {idle:.2f} sync_ms {sync_ms:.1f}")


if __name__ == "__main__":
    main()
