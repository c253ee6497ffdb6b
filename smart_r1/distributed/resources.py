"""What one pipeline run (or sweep trial) asks of Ray: its rollout actors and learners together.

On a fixed-size (local) Ray they must fit at once, else a learner waits forever for CPUs that the
actors hold; an autoscaling cluster grows instead. A sweep runs as many whole trials at a time as
the cluster holds.
"""

from __future__ import annotations

import math
import os

import ray
from ray import tune

from smart_r1.config import RayConfig


def resources_needed(r: RayConfig) -> dict[str, float]:
    """CPUs and GPUs of the rollout actors plus the learners."""
    return {"CPU": r.num_rollout_workers * r.cpus_per_rollout_worker + r.num_learners * r.cpus_per_learner,
            "GPU": r.num_rollout_workers * r.gpus_per_rollout_worker + (r.num_learners if r.use_gpu else 0)}


def check_resources(r: RayConfig) -> None:
    """ValueError when a local Ray cannot hold the actors and learners at once (clusters are not
    checked: they autoscale)."""
    if os.environ.get("RAY_ADDRESS"):
        return
    have = ray.cluster_resources()
    for key, amount in resources_needed(r).items():
        if amount > have.get(key, 0.0) + 1e-9:
            raise ValueError(f"the pipeline needs {amount:g} {key} at once (rollout workers + learners) but "
                             f"this Ray has {have.get(key, 0.0):g}; lower ray.num_rollout_workers, "
                             f"ray.cpus_per_rollout_worker or ray.cpus_per_learner")


def whole_trials(r: RayConfig, cluster: dict[str, float]) -> int:
    """How many trials, rollout actors and learners together, the cluster's resources hold (>= 1)."""
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in resources_needed(r).items() if v > 0]
    return max(1, min(fits)) if fits else 1


def trial_resources(r: RayConfig) -> tune.PlacementGroupFactory:
    """A trial's placement group: an empty head bundle (the trial only drives) and one bundle
    per rollout actor; the learners come from Ray Train's own placement group."""
    actor = {"CPU": r.cpus_per_rollout_worker, "GPU": r.gpus_per_rollout_worker}
    return tune.PlacementGroupFactory([{}] + [actor] * r.num_rollout_workers)
