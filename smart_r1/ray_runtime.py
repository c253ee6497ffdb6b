"""Starting or joining Ray: the one place every entry point (pipeline, sweep, preprocess, the
official evaluator's tasks) gets its Ray from."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket

import ray
from ray._private import ray_constants

# A local Ray listens on loopback only. Ray's servers (GCS, raylet and object manager, every core
# worker, the dashboard, its agents, the autoscaler's metrics) bind 127.0.0.1 when the node's IP is
# 127.0.0.1 and all interfaces otherwise; a local node gets 127.0.0.1 where Ray's multi-node
# support is off (its default on macOS and Windows), which this variable turns off on Linux too.
# It is read when `ray` is imported: set here for the processes a local Ray starts, and this
# process's copy is switched while it starts them. gloo's and NCCL's sockets follow the interface
# named (torch.distributed's store: smart_r1.distributed.learner).
_LO = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), "lo")
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": _LO,
                "NCCL_SOCKET_IFNAME": _LO}


@contextlib.contextmanager
def _loopback_only():
    """Within: a Ray started here gets node IP 127.0.0.1, and its processes inherit LOOPBACK_ENV
    (and keep it; this process gets its own environment back on leaving)."""
    saved_env = {key: os.environ.get(key) for key in LOOPBACK_ENV}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(key, LOOPBACK_ENV[key])
    ray_constants.ENABLE_RAY_CLUSTER = False  # what the variable sets, for this process's Ray
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ensure_ray(num_cpus: int | None = None, log_to_driver: bool = False, private: bool = False,
               env: dict[str, str] | None = None) -> None:
    """Use the Ray this process already joined; else join the cluster named by RAY_ADDRESS (as
    under `ray job submit`); else start a local Ray of its own (never another `ray start` cluster
    found on this machine), listening on 127.0.0.1 only, with Ray's token authentication (on by
    default for a local Ray; RAY_AUTH_MODE=disabled turns it off).

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
    # "local": a new Ray of this run's own; without it, ray.init joins the last `ray start` cluster
    # of this machine's Ray temp folder (someone else's, on a shared machine)
    local = dict(address="local", include_dashboard=False) if private else dict(address="local")
    # Ray gives a local node a fixed 30 s to start; a busy machine can miss that, so try again.
    # The dashboard stays on otherwise: Ray Train's placement-group cleaner asks its State API
    # once a second whether the train controller lives, and warns every time it cannot.
    for attempt in range(3):
        try:
            with _loopback_only():
                ray.init(num_cpus=num_cpus, **local, **quiet)
            node_ip = ray.util.get_node_ip_address()
            if not ipaddress.ip_address(node_ip).is_loopback:  # a Ray that no longer honours the switch
                ray.shutdown()
                raise RuntimeError(f"the local Ray took node IP {node_ip}, not loopback: it would "
                                   "listen on all interfaces")
            return
        except Exception as e:  # ray raises a bare Exception for the start-up timeout
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            print(f"Ray did not start in time (attempt {attempt + 1} of 3); retrying", flush=True)
            ray.shutdown()
