"""Starting or joining Ray: the one place every entry point (pipeline, sweep, preprocess, the
official evaluator's tasks) gets its Ray from."""

from __future__ import annotations

import os

import ray


def ensure_ray(num_cpus: int | None = None, log_to_driver: bool = False, private: bool = False,
               env: dict[str, str] | None = None) -> None:
    """Use the Ray this process already joined; else join the cluster named by RAY_ADDRESS (as
    under `ray job submit`); else start a local Ray.

    num_cpus: caps a local Ray only; a cluster's resources are the cluster's.
    log_to_driver: show the workers' output (training progress) in this process.
    private: never join a cluster, start a local instance without dashboard (for short-lived
        helper tasks that must not queue behind another user's jobs on this machine).
    env: variables set (if unset) before a local Ray starts, so that its workers inherit them.
    """
    if ray.is_initialized():
        return
    quiet = dict(log_to_driver=log_to_driver, configure_logging=False)
    if os.environ.get("RAY_ADDRESS") and not private:
        ray.init(**quiet)
        return
    for key, value in (env or {}).items():
        os.environ.setdefault(key, value)
    local = dict(address="local", include_dashboard=False) if private else {}
    # Ray gives a local node a fixed 30 s to start; a busy machine can miss that, so try again.
    # The dashboard stays on otherwise: Ray Train's placement-group cleaner asks its State API
    # once a second whether the train controller lives, and warns every time it cannot.
    for attempt in range(3):
        try:
            ray.init(num_cpus=num_cpus, **local, **quiet)
            return
        except Exception as e:  # ray raises a bare Exception for the start-up timeout
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            print(f"Ray did not start in time (attempt {attempt + 1} of 3); retrying", flush=True)
            ray.shutdown()
