"""MLflow runs for the pipeline, its stages and Tune trials.

Everything goes through `MlflowClient` with explicit run ids and an absolute tracking URI, so
the same `RunTracker` works in the driver, in a Ray Train worker and in a Tune trial (whose
working directories differ). Only rank 0 of a learner logs: other ranks get `enabled=False`.
The default store is MLflow's own default (a local `mlflow.db` in the working directory for
MLflow 3.x); `MLFLOW_TRACKING_URI` is honoured. On a multi-node Ray the learners log from other
nodes, so a pipeline there needs a tracking server (`cluster_tracking_problem`).
"""

from __future__ import annotations

import os
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smart_r1 import storage

# mlflow is imported where a run is written, not here: every Ray Train controller, learner and
# rollout actor unpickles a RunTracker, and only rank 0 of a learner and the driver ever log
# (importing mlflow costs ~1.6 s of CPU per process).

EXPERIMENT = "smart-r1"
_MAX_PARAM_CHARS = 6000  # MLflow's limit for one param value


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to hand to other processes: MLflow's choice, made absolute."""
    import mlflow

    if uri:
        mlflow.set_tracking_uri(uri)
    return mlflow.get_tracking_uri()


def check_tracking_uri(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, with a clear message, when a tracking server cannot be reached."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            if response.status != 200:
                raise ValueError(f"MLflow tracking server {uri} answered /health with {response.status}")
    except (urllib.error.URLError, OSError) as e:
        raise ValueError(f"MLflow tracking server {uri} is unreachable ({e}); "
                         "start it or unset MLFLOW_TRACKING_URI to log locally") from None


LOCAL_SCHEMES = ("", "file", "sqlite")  # stores that live on the driver's disk


def is_local_store(uri: str) -> bool:
    """Whether a tracking URI names a store on this machine's disk (a folder, `file://`,
    `sqlite:///...`, MLflow 3's default `./mlflow.db`) rather than a server or database."""
    if uri.split(":", 1)[0] in ("databricks", "databricks-uc"):  # a profile name: a hosted server
        return False
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    return scheme.split("+", 1)[0] in LOCAL_SCHEMES


def cluster_tracking_problem(nodes: list[dict], tracking_uri: str, driver_node_id: str) -> str | None:
    """Why a pipeline must not start with this tracking store on this Ray, or None when it may.

    Learners (rank 0) log their metrics to the tracking store themselves, so on a cluster a store
    on the driver's disk would be written on other nodes (to a file that is not the driver's) or
    not at all. `nodes` are `ray.nodes()`; the Ray counts as a cluster when an alive node other than
    the driver's is there, or when the driver's node offers no CPU (an autoscaling head with
    `CPU: 0`, whose learners will run on worker nodes that join later)."""
    if not is_local_store(tracking_uri):
        return None
    alive = [n for n in nodes if n.get("Alive", n.get("alive", False))]
    others = [n for n in alive if n.get("NodeID") != driver_node_id]
    own = [n for n in alive if n.get("NodeID") == driver_node_id]
    head_without_cpu = bool(own) and not own[0].get("Resources", {}).get("CPU", 0)
    if not others and not head_without_cpu:
        return None
    where = f"{len(alive)} nodes" if others else "a head without CPUs (work runs on other nodes)"
    return (f"MLflow tracking store {tracking_uri} is a local file but this Ray cluster has {where}, whose "
            "learners log to it directly: set MLFLOW_TRACKING_URI to a tracking server that every node "
            "reaches (e.g. http://HEAD_IP:5000, see the README's cluster section)")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"rft.alpha": "0.77", ...} (stages keyed by their name)."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) and "name" in v for v in value):
            for v in value:
                out.update(flatten(v, f"{name}.{v['name']}."))
        else:
            out[name] = str(value)[:_MAX_PARAM_CHARS]
    return out


@dataclass(frozen=True)
class RunTracker:
    tracking_uri: str
    run_id: str
    enabled: bool = True

    @property
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k.replace("/", "_"), float(v), now, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float))]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file (a local path, or a URI: downloaded to a temporary file of the same name
        first); nothing when it does not exist."""
        if not self.enabled or not storage.exists(path):
            return
        if storage.is_local(path):
            self.client.log_artifact(self.run_id, storage.resolve(path)[1], artifact_path)
            return
        with tempfile.TemporaryDirectory() as d:
            local = Path(d) / storage.base_name(path)
            local.write_bytes(storage.read_bytes(path))
            self.client.log_artifact(self.run_id, str(local), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, v)

    def child(self, name: str) -> "RunTracker":
        """A nested run (a stage or a trial), or this tracker again when disabled."""
        if not self.enabled:
            return self
        parent = self.client.get_run(self.run_id)
        run = self.client.create_run(parent.info.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": self.run_id})
        return RunTracker(self.tracking_uri, run.info.run_id)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.client.set_terminated(self.run_id, status)

    def for_rank(self, rank: int) -> "RunTracker":
        return RunTracker(self.tracking_uri, self.run_id, self.enabled and rank == 0)


def start_run(name: str, tracking_uri: str | None = None, experiment: str = EXPERIMENT,
              run_id: str | None = None) -> RunTracker:
    """A new top-level run (or an existing one, to resume), after checking the server is up."""
    uri = resolve_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    check_tracking_uri(uri)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        return RunTracker(uri, run_id)
    return RunTracker(uri, client.create_run(_experiment_id(client, experiment), run_name=name).info.run_id)


def _experiment_id(client, name: str) -> str:
    """The experiment's id, made when absent. Two drivers starting at once on a new server may
    both find it absent: the one whose creation is refused reads the other's."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


RUN_ID_FILE = "mlflow_run_id"


def folder_run(folder: str | Path, name: str, parent: RunTracker | None = None,
               tracking_uri: str | None = None) -> tuple[RunTracker, bool]:
    """The MLflow run of a run folder (a local folder or a storage URI): the one whose id
    `<folder>/mlflow_run_id` records (resumed), else a new one (top-level, or nested under
    `parent`), whose id is then written there atomically. Returns (tracker, True if new). A
    pipeline, a sweep and each sweep trial keep their run across restarts (and drivers) this way."""
    if storage.is_local(folder):
        Path(storage.resolve(folder)[1]).mkdir(parents=True, exist_ok=True)
    id_file = storage.join(folder, RUN_ID_FILE)
    if storage.exists(id_file):
        run_id = storage.read_text(id_file).strip()
        if parent is not None:
            return RunTracker(parent.tracking_uri, run_id), False
        return start_run(name, tracking_uri, run_id=run_id), False
    tracker = parent.child(name) if parent is not None else start_run(name, tracking_uri)
    storage.write_text(id_file, tracker.run_id)
    return tracker, True
