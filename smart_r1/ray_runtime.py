"""Starting or joining Ray: the one place every entry point (pipeline, sweep, preprocess, the
official evaluator's tasks) gets its Ray from, and what of Ray's own output reaches its console.

Quiet consoles. Workers' output reaches the driver through Ray's log forwarding (`log_to_driver`),
each line prefixed with its process ("(RayTrainWorker pid=..., ip=...)"). In quiet mode (the
pipelines' default; `--verbose` turns it off) the driver prints its workers' standard output
without that prefix (our progress lines already name their stage; error output keeps it, to say
where it came from) and drops the lines of RAY_NOISE. Ray Train's own INFO lines (worker group
started, checkpoint created) are kept off the console by its `RunConfig(logging_config=...)`
(`smart_r1.distributed.learner.train_logging`), MLflow's by `quiet_libraries`. Everything stays
in Ray's log files (`<temp dir>/session_latest/logs`, `ray logs`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import sys
import tempfile

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


# Lines Ray prints on consoles by itself that tell a user of this project nothing (Ray's log files
# keep them). Each: a substring of the line, and why it is harmless here.
RAY_NOISE = (
    # Ray's core (C++, once per process) on creating an actor with max_restarts and an ObjectRef
    # among its constructor arguments (ray#53727: a restart fails if the object is lost). Our
    # rollout actors' checkpoint refs live as long as the driver that put them
    # (worker_kit.weights_ref); Ray Train's controller does the same for its own actors.
    "has constructor arguments in the object store and max_restarts > 0",
    # Ray Train's worker logs each report (its metrics and checkpoint) at INFO under a logger named
    # by its source file, not "ray.train", which the LoggingConfig of its RunConfig does not reach
    "Reporting training result ",
)
_quiet = False  # ensure_ray(quiet=True) was called in this process


def _noise(line: str) -> bool:
    return any(pattern in line for pattern in RAY_NOISE)


def _quiet_worker_logs() -> None:
    """Replace Ray's printer of forwarded worker output (`log_to_driver`) with one that drops
    RAY_NOISE and leaves the "(Actor pid=...)" prefix off standard-output lines."""
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    def show(data: dict) -> None:
        lines = [line for line in data.get("lines", []) if not _noise(line)]
        if lines:
            ray_worker.print_to_stdstream({**data, "lines": lines}, ignore_prefix=not data.get("is_err"))

    dispatcher.remove_handler("ray_print_logs")  # the name Ray's own printer is registered under
    dispatcher.add_handler("ray_print_logs", show)


@contextlib.contextmanager
def native_noise_filtered():
    """Within (in quiet mode only): what this process writes to its standard error file
    descriptor, where Ray's C++ core logs, is held in a temporary file and written back after,
    less the lines of RAY_NOISE. For short calls into Ray that start no process (creating actors:
    the raylet starts them), since a process started within would keep writing to that file."""
    if not _quiet:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True)
                    if not _noise(line.decode(errors="replace"))]
            if kept:
                os.write(2, b"".join(kept))


def quiet_libraries() -> None:
    """The libraries a driver runs beside Ray keep to warnings on its console: MLflow's store
    set-up ("Creating initial MLflow database tables", alembic's migrations) and its "View run ...
    at" links when a run ends. MLflow sets its loggers' level when imported, from
    MLFLOW_LOGGING_LEVEL."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def ensure_ray(num_cpus: int | None = None, log_to_driver: bool = False, private: bool = False,
               env: dict[str, str] | None = None, quiet: bool = False) -> None:
    """Use the Ray this process already joined; else join the cluster named by RAY_ADDRESS (as
    under `ray job submit`); else start a local Ray of its own (never another `ray start` cluster
    found on this machine), listening on 127.0.0.1 only, with Ray's token authentication (on by
    default for a local Ray; RAY_AUTH_MODE=disabled turns it off).

    num_cpus: caps a local Ray only; a cluster's resources are the cluster's.
    log_to_driver: show the workers' output (training progress) in this process.
    private: never join a cluster, start a local instance without dashboard (for short-lived
        helper tasks that must not queue behind another user's jobs on this machine).
    env: variables set (if unset) before a local Ray starts, so that its workers inherit them.
    quiet: keep Ray's own chatter off this console (see the module's docstring).
    """
    global _quiet
    if ray.is_initialized():
        return
    _quiet = quiet
    if os.environ.get("RAY_ADDRESS") and not private:
        _init(dict(log_to_driver=log_to_driver, configure_logging=False), quiet and log_to_driver)
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
                _init(dict(num_cpus=num_cpus, **local, log_to_driver=log_to_driver, configure_logging=False),
                      quiet and log_to_driver)
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


def _init(kwargs: dict, quiet_logs: bool) -> None:
    """ray.init; with quiet_logs, the driver's printer of its workers' output is the quiet one."""
    ray.init(**kwargs)
    if quiet_logs:
        _quiet_worker_logs()
