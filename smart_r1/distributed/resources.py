"""What one pipeline run (or sweep trial) asks of Ray: its rollout actors and learners together.

On a fixed-size (local) Ray they must fit at once, else a learner waits forever for CPUs that the
actors hold; an autoscaling cluster grows instead. A sweep runs as many whole trials at a time as
the cluster holds at its autoscaling maximum (a cluster that starts from zero workers still runs
its trials side by side once it has grown).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import ray
import yaml
from ray import tune

from smart_r1.config import RayConfig


def resources_needed(r: RayConfig) -> dict[str, float]:
    """CPUs and GPUs of the rollout actors plus the learners."""
    return {"CPU": r.num_rollout_workers * r.cpus_per_rollout_worker + r.num_learners * r.cpus_per_learner,
            "GPU": r.num_rollout_workers * r.gpus_per_rollout_worker + (r.num_learners * r.gpus_per_learner if r.use_gpu else 0)}


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


# Where the cluster launcher (`ray up`) leaves the autoscaling config on the head node.
BOOTSTRAP_CONFIG = Path.home() / "ray_bootstrap_config.yaml"


def autoscaling_max(path: str | Path = BOOTSTRAP_CONFIG) -> dict[str, float] | None:
    """The cluster's resources once the autoscaler has started every node it may: from the cluster
    launcher's config (each node type's `resources` times its `max_workers`, the head's once), or
    None where there is no such config (a local Ray, KubeRay: give `--max-concurrent-trials`).
    The global `max_workers` cap is not applied: the figure is an upper bound."""
    path = Path(path)
    if not path.is_file():
        return None
    config = yaml.safe_load(path.read_text()) or {}
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    total: dict[str, float] = {}
    for name, node in types.items():
        count = int(node.get("max_workers", 0)) + (1 if name == head else 0)
        for key, amount in (node.get("resources") or {}).items():
            total[key] = total.get(key, 0.0) + float(amount) * count
    return total or None


def whole_trials(r: RayConfig, cluster: dict[str, float]) -> int:
    """How many trials, rollout actors and learners together, the cluster's resources hold (>= 1)."""
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in resources_needed(r).items() if v > 0]
    return max(1, min(fits)) if fits else 1


def trial_resources(r: RayConfig) -> tune.PlacementGroupFactory:
    """A trial's placement group: an empty head bundle (the trial only drives) and one bundle
    per rollout actor; the learners come from Ray Train's own placement group."""
    actor = {"CPU": r.cpus_per_rollout_worker, "GPU": r.gpus_per_rollout_worker}
    return tune.PlacementGroupFactory([{}] + [actor] * r.num_rollout_workers)
