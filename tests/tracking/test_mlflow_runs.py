"""RunTracker against a real MLflow server: nested runs, params, metrics, artefacts, rank 0 only."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from smart_r1.tracking.mlflow_runs import check_tracking_uri, flatten, start_run


def test_flatten_names_stages():
    flat = flatten({"seed": 0, "ray": {"num_learners": 2},
                    "stages": [{"name": "rft", "alpha": 0.77}, {"name": "sft", "top_k": 5}]})
    assert flat == {"seed": "0", "ray.num_learners": "2", "stages.rft.name": "rft",
                    "stages.rft.alpha": "0.77", "stages.sft.name": "sft", "stages.sft.top_k": "5"}


def test_nested_runs_on_a_real_server(mlflow_server, tmp_path):
    parent = start_run("pipeline", tracking_uri=mlflow_server, experiment="test-tracking")
    parent.log_params({"rft": {"alpha": 0.77}})
    stage = parent.child("rft")
    for step in range(3):
        stage.log_metrics({"loss": 1.0 / (step + 1), "time_update_s": 0.1}, step=step)
    stage.for_rank(1).log_metrics({"loss": 123.0}, step=9)  # a non-zero rank logs nothing
    art = tmp_path / "table.json"
    art.write_text('{"metametric": 0.5}')
    stage.log_artifact(art, "metrics")
    stage.finish()
    parent.finish()

    client = MlflowClient(mlflow_server)
    run = client.get_run(stage.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    history = client.get_metric_history(stage.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2] and history[-1].value == pytest.approx(1 / 3)
    assert [a.path for a in client.list_artifacts(stage.run_id, "metrics")] == ["metrics/table.json"]
    assert client.get_run(parent.run_id).data.params["rft.alpha"] == "0.77"
    assert run.info.status == "FINISHED"


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(ValueError, match="unreachable"):
        check_tracking_uri("http://127.0.0.1:9", timeout_s=2)
