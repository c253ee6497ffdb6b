"""A pipeline on a multi-node Ray refuses a tracking store on the driver's disk (its learners log
from other nodes), decided from (ray.nodes(), tracking URI, the driver's node)."""

from __future__ import annotations

import pytest

from smart_r1.tracking.mlflow_runs import cluster_tracking_problem, is_local_store


def _node(node_id: str, cpus: float = 2.0, alive: bool = True) -> dict:
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": cpus} if cpus else {}}


@pytest.mark.parametrize("uri,local", [
    ("sqlite:////work/run/mlflow.db", True), ("sqlite:///mlflow.db", True), ("./mlruns", True),
    ("/abs/mlruns", True), ("file:///abs/mlruns", True),
    ("http://10.0.0.2:5000", False), ("https://mlflow.example.com", False), ("databricks", False),
    ("postgresql://user@db:5432/mlflow", False), ("mysql+pymysql://db/mlflow", False),
])
def test_local_store(uri, local):
    assert is_local_store(uri) is local


def test_refuses_a_local_store_on_a_cluster_only():
    one = [_node("head")]
    two = [_node("head"), _node("worker")]
    sqlite = "sqlite:////home/me/mlflow.db"
    assert cluster_tracking_problem(one, sqlite, "head") is None  # a local Ray: fine
    assert cluster_tracking_problem(two, "http://10.0.0.2:5000", "head") is None  # a server: fine
    message = cluster_tracking_problem(two, sqlite, "head")
    assert message and "\n" not in message
    assert "MLFLOW_TRACKING_URI" in message and sqlite in message and "2 nodes" in message
    # an autoscaling head with CPU: 0 and no workers yet: the learners will run elsewhere
    assert "head without CPUs" in cluster_tracking_problem([_node("head", cpus=0)], sqlite, "head")
    # a driver outside the cluster (its node is not among them)
    assert cluster_tracking_problem(one, sqlite, "laptop") is not None
    # dead nodes do not count
    assert cluster_tracking_problem([_node("head"), _node("gone", alive=False)], sqlite, "head") is None
