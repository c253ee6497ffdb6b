"""Learner loop of the RFT stage (MPO), run by every Ray Train worker. It moves data and weights;
the method is `smart_r1.rl.mpo.mpo_step`.

One RL step:
    rollout   rank 0 hands this step's scenarios to the rollout workers through a queue (a free
              actor takes the next scenario) and waits for their experiences
    adv       stale experiences (weights more than `max_staleness` versions old) are dropped,
              failed rollouts are dropped and counted (never scored as zero: with a fixed
              baseline a zero reward would push the policy away from whatever it sampled);
              the rest are collated into one `ExperienceBatch`; when fewer than
              `min_rollout_fraction` of the step's scenarios are usable, the step is sampled again
              once, then the stage stops with the failures named (every wait is bounded by
              `ray.task_timeout_s`)
    update    `mpo_step` on this rank's share, gradients averaged over ranks
    sync      one `ray.put` of the new weights, tagged with the next version
With max_staleness >= 1 the next step's rollouts are dispatched before the update (with the
current weights), so the workers sample while the learner updates; `mpo_step` then applies the
clipped ratio surrogate, which corrects for the one-version lag.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import ray
import torch.distributed as dist

from smart_r1.distributed import rollout_tasks
from smart_r1.distributed.rollout_tasks import RolloutQueue
from smart_r1.distributed.rollout_worker import RolloutSpec
from smart_r1.distributed.timing import PhaseTimer, format_phases
from smart_r1.distributed.worker_kit import (LearnerJob, Progress, fetch_checkpoint, maybe_fail, peak_rss_mb, report,
                                            say, start_training)
from smart_r1.model.checkpoint import load_checkpoint
from smart_r1.rl.experience import collate_experiences
from smart_r1.rl.mpo import mpo_step
from smart_r1.rl.optim import NonFiniteGuard
from smart_r1.storage import join, read_json, write_json
from smart_r1.types import Experience

ALPHA_FILE = "alpha.json"  # alpha: auto, as calibrated
REFERENCE_IN_WORKERS_ENV = "SMART_R1_REFERENCE_IN_WORKERS"  # "0": the learner runs pi_ref (to compare)


def step_scenarios(seed: int, step: int, num_scenarios: int, count: int) -> list[int]:
    """The scenarios of an RL step: a fixed function of (seed, step), so a resumed run repeats it."""
    rng = np.random.default_rng([seed, step])
    return sorted(rng.choice(num_scenarios, size=count, replace=count > num_scenarios).tolist())


def dispatch(workers: list, version: int, weights_ref, indices: list[int], spec: RolloutSpec) -> RolloutQueue:
    return rollout_tasks.dispatch(workers, "rollout", indices, version, [weights_ref], "train", spec)


def collect(queue: RolloutQueue, timeout_s: float) -> tuple[list[Experience], int]:
    """Experiences of the queue's scenarios; failed scenarios and calls are counted and named, not kept."""
    experiences, failures = rollout_tasks.gather(queue, timeout_s, "RL step rollouts")
    for message in failures:
        say(f"[rft] dropped: {message}")
    return experiences, len(failures)


def calibrated_alpha(job: LearnerJob, experiences: list[Experience], rank: int, world_size: int) -> float:
    """`alpha: auto`: the mean reward of the starting policy's first batch (rank 0 has it all),
    fixed for the rest of the stage and recorded in `<stage_dir>/alpha.json`, which a resumed
    stage reads back."""
    path = join(job.stage_dir, ALPHA_FILE)  # the stage's folder in the run's storage (local or URI)
    box = [0.0]
    if rank == 0:  # decides, and tells the other ranks
        recorded = read_json(path, None)
        if recorded is not None:
            box[0] = float(recorded["alpha"])
        else:
            box[0] = float(np.mean([e.rewards.mean() for e in experiences]))
            write_json(path, {"alpha": box[0], "from_scenarios": len(experiences), "auto": True})
            say(f"[{job.stage.name}] alpha: auto = {box[0]:.4f} (the starting policy's mean reward on "
                f"{len(experiences)} scenarios), fixed from here on")
    if world_size > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _share(experiences: list[Experience], rank: int, world_size: int) -> list[Experience]:
    """Rank 0 collected everything; every rank takes its round-robin share."""
    if world_size > 1:
        box = [experiences]
        dist.broadcast_object_list(box, src=0)
        experiences = box[0]
    share = experiences[rank::world_size]
    return share or experiences[:1]  # a rank never idles with an empty batch (keeps all-reduce in step)


def mpo_loop(config: dict) -> None:
    job: LearnerJob = config["job"]
    stage = job.stage
    model, optimizer, device, rank, world_size, start = start_training(job, "step")
    ref_model = load_checkpoint(fetch_checkpoint(job.ref_checkpoint or job.init_checkpoint), map_location=device)
    ref_model.requires_grad_(False)
    workers = job.rollout_workers
    num_scenarios = ray.get(workers[0].num_scenarios.remote("train"), timeout=job.task_timeout_s)
    spec = RolloutSpec.of_stage(stage)
    if rank == 0 and stage.kl_estimator == "k3" and os.environ.get(REFERENCE_IN_WORKERS_ENV, "1") != "0":
        # the workers run the frozen reference on their own rollouts and send log pi_ref: the
        # update skips that forward pass (mpo_step); the 'full' estimator needs it here
        spec = dataclasses.replace(spec, reference=(ray.put({k: v.detach().cpu()
                                                             for k, v in ref_model.state_dict().items()}),))
    overlap = stage.max_staleness >= 1
    timer = PhaseTimer()
    guard = NonFiniteGuard(f"stage {stage.name}", stage.max_nonfinite_updates)
    progress = Progress(stage.name, stage.steps, start, rank == 0)
    if rank == 0:
        objective = ("the clipped ratio surrogate (MPO-3): batches are reused or sampled one update ahead"
                     if overlap or stage.updates_per_batch > 1 else "A * log pi (MPO-2): on-policy, each batch used once")
        say(f"[{stage.name}] objective: {objective}")

    def weights():
        with timer.phase("sync"):  # the one ray.put per update
            return ray.put({k: v.detach().cpu() for k, v in model.state_dict().items()})

    def scenarios_of(step: int) -> list[int]:
        return step_scenarios(job.seed, step, num_scenarios, stage.scenarios_per_step)

    def usable(queue: RolloutQueue) -> tuple[list[Experience], int, int]:
        """(fresh experiences, failed scenarios, stale scenarios) of a dispatched step."""
        experiences, failed = collect(queue, job.task_timeout_s)
        fresh = [e for e in experiences if version - e.version <= stage.max_staleness]
        return fresh, failed, len(experiences) - len(fresh)

    needed = math.ceil(stage.min_rollout_fraction * stage.scenarios_per_step)
    version = start
    pending = dispatch(workers, version, weights(), scenarios_of(start), spec) if rank == 0 else []
    for step in range(start, stage.steps):
        maybe_fail(job, step)
        for phase in ("rollout", "sync"):  # every row names every phase (0 s where skipped)
            timer.add(phase, 0.0)
        experiences, failed, stale = [], 0, 0
        if rank == 0:
            with timer.phase("rollout"):
                experiences, failed, stale = usable(pending)
                if len(experiences) < needed:  # sample this step again, once, with the current weights
                    say(f"[{stage.name}] RL step {step}: {len(experiences)} of {stage.scenarios_per_step} scenarios "
                        f"usable ({failed} failed, {stale} stale); sampling it again")
                    experiences, failed_again, stale_again = usable(
                        dispatch(workers, version, weights(), scenarios_of(step), spec))
                    failed, stale = failed + failed_again, stale + stale_again
                    if len(experiences) < needed:
                        raise RuntimeError(
                            f"stage {stage.name}, RL step {step}: only {len(experiences)} of {stage.scenarios_per_step} "
                            f"scenarios gave usable rollouts twice (min_rollout_fraction {stage.min_rollout_fraction}); "
                            "the failures are named above")
            if overlap and step + 1 < stage.steps:  # sample the next step while this one updates
                pending = dispatch(workers, version, weights(), scenarios_of(step + 1), spec)
        if stage.alpha == "auto":  # the first batch, sampled by the starting policy, calibrates it
            stage = dataclasses.replace(stage, alpha=calibrated_alpha(job, experiences, rank, world_size))
        experiences = _share(experiences, rank, world_size)
        if not experiences:
            raise RuntimeError(f"RL step {step}: every rollout failed or was stale")
        with timer.phase("adv"):
            batch = collate_experiences(experiences, device)
        with timer.phase("update"):
            stats = mpo_step(model, ref_model, optimizer, batch, stage, version, world_size)
        if guard.update(stats["grad_norm"], f"RL step {step}"):
            version += 1  # the weights changed (a skipped update leaves the version as it was)
        else:
            say(f"[{stage.name}] RL step {step}: non-finite loss or gradient, update skipped")
        if rank == 0 and not overlap and step + 1 < stage.steps:
            pending = dispatch(workers, version, weights(), scenarios_of(step + 1), spec)
        worker_time = {f"worker_{k}_s": float(np.mean([e.seconds.get(k, 0.0) for e in experiences]))
                       for k in ("rollout", "reward", "reference")}
        metrics = {
            "step": step, "version": version, "alpha": stage.alpha, **stats, **worker_time, **timer.lap(),
            "reward": float(np.mean([e.rewards.mean() for e in experiences])),
            "realism": float(np.mean([e.realism.mean() for e in experiences])),
            "collision_rate": float(np.mean([e.collision.mean() for e in experiences])),
            "offroad_rate": float(np.mean([e.offroad.mean() for e in experiences])),
            "rollouts_failed": failed, "rollouts_stale": stale, "scenarios": len(experiences),
            "nonfinite_skipped": guard.skipped, "peak_rss_mb": peak_rss_mb(),
        }
        progress.line(step + 1, f"reward {metrics['reward']:.3f} realism {metrics['realism']:.3f} "
                                f"coll {metrics['collision_rate']:.3f} off {metrics['offroad_rate']:.3f} "
                                f"kl {stats['kl']:.4f} | {format_phases({k: v for k, v in metrics.items() if k.startswith('time_')})}")
        report(job, model, optimizer, step, metrics, rank)
