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
        return
    # Ray gives a local node a fixed 30 s to start; a busy machine can miss that, so try again.
    # The dashboard stays on: Ray Train's placement-group cleaner asks its State API once a
    # second whether the train controller lives, and warns every time it cannot.
    for attempt in range(3):
        try:
            ray.init(num_cpus=num_cpus, **quiet)
            return
        except Exception as e:  # ray raises a bare Exception for the start-up timeout
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            print(f"Ray did not start in time (attempt {attempt + 1} of 3); retrying", flush=True)
            ray.shutdown()
