"""`smart-r1 evaluate` / `export-submission` on the real scenario, and their bad-input messages."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from waymo_open_dataset.protos import sim_agents_submission_pb2 as submission_pb2

from smart_r1.cli import main


@pytest.fixture(scope="module")
def test_submission_path() -> Path:
    from waymo_open_dataset.protos import scenario_pb2

    package = Path(scenario_pb2.__file__).resolve().parents[1]
    return package / "utils" / "sim_agents" / "testdata" / "test_submission.binproto"


@pytest.fixture(scope="module")
def tiny_checkpoint(womd_record, tmp_path_factory) -> Path:
    """An untrained SMART-tiny ('test' preset) with a 64-token vocabulary from the real scenario."""
    import torch

    from smart_r1.model.checkpoint import save_checkpoint
    from smart_r1.model.config import ModelConfig
    from smart_r1.model.smart_tiny import SmartTiny
    from smart_r1.tokens.motion_vocab import build_vocab

    torch.manual_seed(0)
    model = SmartTiny(ModelConfig.preset("test"), build_vocab([womd_record], size=64, iters=3))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model)
    return path


@pytest.mark.slow
def test_evaluate_official_test_submission_into_mlflow(womd_path, test_submission_path, tmp_path, monkeypatch):
    """Scoring the official constant-velocity rollouts gives the official evaluator's numbers
    (DESIGN.md: metametric 0.25824, collision 0.6875, off-road 0.265625, minADE 2.0846887)."""
    import mlflow

    from smart_r1.evaluation.evaluate import EvaluateConfig, evaluate

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    out = tmp_path / "results.json"
    cfg = EvaluateConfig(data=str(womd_path), rollouts=str(test_submission_path), out=str(out), num_renders=1)
    with mlflow.start_run() as run:
        result, renders = evaluate(cfg, progress=False)
    row = result.leaderboard
    assert row.realism_meta_metric == pytest.approx(0.25824, abs=2e-3)
    assert row.simulated_collision_rate == pytest.approx(0.6875, abs=1e-6)
    assert row.simulated_offroad_rate == pytest.approx(0.265625, abs=1e-6)
    assert row.min_ade == pytest.approx(2.0846887, abs=1e-3)

    saved = json.loads(out.read_text())
    assert saved["leaderboard"]["metametric"] == pytest.approx(row.realism_meta_metric)
    assert {"kinematic_metrics", "interactive_metrics", "map_based_metrics",
            "traffic_light_violation_likelihood"} <= set(saved["leaderboard"])
    assert saved["per_scenario"][0]["scenario_id"] == "637f20cafde22ff8"
    assert [p.name for p in renders] == ["637f20cafde22ff8.png"] and renders[0].stat().st_size > 20_000

    client = mlflow.MlflowClient()
    logged = client.get_run(run.info.run_id).data.metrics
    assert logged["eval/simulated_collision_rate"] == pytest.approx(0.6875)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/renders")}
    assert artifacts == {"evaluation/renders/637f20cafde22ff8.png"}
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_evaluate_and_export_with_a_model(womd_path, tiny_checkpoint, tmp_path, capsys):
    from waymo_open_dataset.utils.sim_agents import submission_specs

    from smart_r1.data.womd import read_scenario_protos

    out = tmp_path / "results.json"
    assert main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(womd_path),
                 "--num-rollouts", "2", "--num-renders", "0", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "Realism Meta" in table and "Map-based" in table
    metametric = json.loads(out.read_text())["leaderboard"]["metametric"]
    assert 0.0 < metametric < 1.0

    export = tmp_path / "export"
    assert main(["export-submission", "--checkpoint", str(tiny_checkpoint), "--data", str(womd_path),
                 "--out", str(export), "--account-name", "a@b.c", "--method-name", "tiny"]) == 0
    with tarfile.open(export / "submission.tar.gz") as tar:
        (name,) = tar.getnames()
        shard = submission_pb2.SimAgentsChallengeSubmission.FromString(tar.extractfile(name).read())
    assert name == "submission.binproto-00000-of-00001"
    assert shard.unique_method_name == "tiny" and int(shard.num_model_parameters) > 1000
    (scenario,) = read_scenario_protos(womd_path)
    submission_specs.validate_scenario_rollouts(shard.scenario_rollouts[0], scenario)


def test_bad_inputs_give_a_message_and_exit_code(womd_path, test_submission_path, tmp_path, capsys):
    def run(*argv) -> str:
        assert main(list(argv)) == 2
        return capsys.readouterr().err

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert "not a readable SMART-tiny checkpoint" in run("evaluate", "--checkpoint", str(garbage), "--data", str(womd_path))
    assert "does not exist" in run("evaluate", "--checkpoint", str(tmp_path / "absent.pt"),
                                   "--data", str(womd_path))
    (tmp_path / "empty").mkdir()
    assert "holds no scenario" in run("evaluate", "--rollouts", str(test_submission_path),
                                      "--data", str(tmp_path / "empty"))
    assert "no TFRecord files match" in run("evaluate", "--rollouts", str(test_submission_path),
                                            "--data", str(tmp_path / "none*.tfrecord"))
    # Rollouts of another scenario: the proto under another scenario id.
    submission = submission_pb2.SimAgentsChallengeSubmission.FromString(test_submission_path.read_bytes())
    rollouts = submission.scenario_rollouts[0]
    rollouts.scenario_id = "another-scenario"
    other = tmp_path / "other.binproto"
    other.write_bytes(rollouts.SerializeToString())
    err = run("evaluate", "--rollouts", str(other), "--data", str(womd_path))
    assert "has no rollouts for scenario 637f20cafde22ff8" in err and "another-scenario" in err
    assert "account name" in run("export-submission", "--checkpoint", str(garbage), "--data", str(womd_path),
                                 "--out", str(tmp_path / "x"), "--account-name", " ", "--method-name", "m")
