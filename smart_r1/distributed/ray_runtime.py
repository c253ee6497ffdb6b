"""Starting or joining Ray the same way from every entry point."""

from __future__ import annotations

import os


def ensure_ray(num_cpus: int | None = None, log_to_driver: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local Ray.

    `num_cpus` caps a local Ray only; a cluster's resources are the cluster's. `log_to_driver`
    shows the workers' output (training progress) in this process.
    """
    import ray

    if ray.is_initialized():
        return
    quiet = dict(log_to_driver=log_to_driver, configure_logging=False)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)
