"""The SFT-RFT-SFT pipeline end to end: `ray job submit` against a local `ray start --head`,
a learner failure that resumes from its checkpoint, per-stage tables. (Re-runs after a crash,
which skip finished stages, are test_crash_recovery.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_job_succeeds_with_tables(submitted):
    out, proc = submitted
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads((out / "results.json").read_text())
    assert list(rows) == ["bc", "sft", "rft", "sft_final"]
    for stage, by_data in rows.items():
        m = by_data["sumo_heldout"]  # generated SUMO held-out scenes, named for what they are
        assert 0.0 < m["metametric"] < 1.0 and m["scenarios"] == 3
        for key in ("simulated_collision_rate", "simulated_offroad_rate"):
            assert 0.0 <= m[key] <= 1.0
        assert m["min_average_displacement_error"] > 0
        lo, hi = m["metametric_ci95"]  # 95% bootstrap over the 3 scenarios
        assert lo - 1e-9 <= m["metametric"] <= hi + 1e-9
        assert (out / stage / "done.json").exists()
        scores = json.loads((out / stage / "scores_sumo_heldout.json").read_text())
        assert len(scores["records"]) == 3 and scores["num_rollouts"] == 2
    results = (out / "results.md").read_text()
    assert "| rft | sumo_heldout |" in results and "| sft -> rft | sumo_heldout |" in results


def test_learner_failure_resumed_from_checkpoint(submitted):
    out, proc = submitted
    assert "injected learner failure at 1" in proc.stdout + proc.stderr
    assert "[sft] resuming after epoch 0" in proc.stdout + proc.stderr
    log = [json.loads(line) for line in (out / "sft" / "train_log.jsonl").read_text().splitlines()]
    assert [row["progress"] for row in log] == [0, 1]  # epoch 0 was not trained twice


def test_supervised_stages_stream_token_shards_made_once(submitted):
    out, proc = submitted
    text = proc.stdout + proc.stderr
    folders = sorted((out / "tokens").glob("*/train/*"))  # <vocab hash>/<data set>/<options>: one per scene kind
    assert [f.name for f in folders] == ["v1-all64", "v1-sim128"]
    for folder in folders:
        done = json.loads((folder / "done.json").read_text())
        assert done["shards"] == [p.name for p in sorted((out / "data" / "train").glob("*.parquet"))]
        assert sum(pq.read_metadata(folder / name).num_rows for name in done["shards"]) == 8
    assert text.count("[tokens] train 1/1 ") == 1, "tokenised once, before the first stage"
    for stage in ("bc", "sft", "sft_final"):
        assert f"[{stage}] global batch 1 learners x 4 scenarios = 4" in text
        rows = [json.loads(line) for line in (out / stage / "train_log.jsonl").read_text().splitlines()]
        assert all(r["peak_rss_mb"] > 0 and "time_data_s" in r for r in rows), rows
    assert "8 scenes in 1 row groups" in text
    # rollout actors live only while a stage uses them: started for BC's evaluation, killed before
    # SFT's learners, started for SFT's evaluation and kept through RFT and its evaluation, killed
    # before the final SFT's learners, started for its evaluation: three sets, each measured
    workers = json.loads((out / "rollout_workers.json").read_text())
    assert len(workers["per_start"]) == 3 and all(p > 0 for run in workers["per_start"] for p in run)
    assert workers["peak_rss_mb"] == [max(run[0] for run in workers["per_start"])]


def test_rft_updates_the_policy_with_phase_timings(submitted):
    out, _ = submitted
    log = [json.loads(line) for line in (out / "rft" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [0, 1, 2]
    for row in log:
        for phase in ("time_rollout_s", "time_adv_s", "time_update_s", "time_sync_s"):
            assert phase in row
        assert row["rollouts_failed"] == 0 and row["scenarios"] == 2
        assert row["kl"] >= 0.0
    sft = torch.load(out / "sft" / "model.pt", weights_only=True)["state_dict"]
    rft = torch.load(out / "rft" / "model.pt", weights_only=True)["state_dict"]
    # one copy of the training state, the stage folder's (the stage's model.pt is made from it);
    # Ray Train gets metrics only
    assert not [p for p in (out / "ray").glob("*/checkpoint_*")]
    state = torch.load(out / "rft" / "last_state.pt", weights_only=True)
    assert state["progress"] == 2 and all(torch.equal(state["model"][k], rft[k]) for k in rft)
    changed = [k for k in sft if not torch.equal(sft[k], rft[k])]
    assert len(changed) > 0.9 * len(sft), "MPO should move (nearly) every parameter"


def test_mlflow_holds_the_pipeline_and_its_stages(submitted, mlflow_server):
    from mlflow.tracking import MlflowClient

    out, _ = submitted
    client = MlflowClient(mlflow_server)
    parent_id = (out / "mlflow_run_id").read_text().strip()
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["stages.rft.alpha"] == "0.77"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"bc", "sft", "rft", "sft_final"}
    rft = by_name["rft"]
    assert rft.data.params["alpha"] == "0.77" and rft.data.params["kind"] == "mpo"
    assert [m.step for m in client.get_metric_history(rft.info.run_id, "reward")] == [0, 1, 2]
    assert "sumo_heldout_metametric" in rft.data.metrics
    assert client.get_metric_history(rft.info.run_id, "time_update_s")
    artifacts = {a.path for a in client.list_artifacts(rft.info.run_id)}
    assert {"checkpoints", "plots", "metrics.json"} <= artifacts
    assert [a.path for a in client.list_artifacts(rft.info.run_id, "plots")] == ["plots/rollout.png"]
    assert "results.md" in {a.path for a in client.list_artifacts(parent_id)}


def test_invalid_config_fails_before_cluster_work(tmp_path, tiny_config):
    config = tiny_config(tmp_path / "bad.yaml", tmp_path / "never")
    for override, message in (("rft.alpha=1.2", "alpha must lie in [0, 1]"),
                              ("sft.catk_k=0", "catk_k"), ("data.train=/no/such/data", "no such path")):
        proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "sft_rft_sft.py"), "--config", str(config),
                               "--set", override], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr
        assert not (tmp_path / "never").exists()
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "sft_rft_sft.py"), "--config", str(config),
                           "--inject-learner-failure", "nostage:1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown stage name 'nostage'" in proc.stderr


def test_the_console_shows_our_lines_not_rays_internals(submitted):
    """Quiet by default: the job's console holds the pipeline's progress lines (without Ray's
    "(Actor pid=...)" prefix) and tables, and none of Ray's INFO chatter (Ray Train's worker
    groups, checkpoints, reports) nor its warning about actors' constructor arguments; the
    injected learner failure is still told (ray_runtime's docstring)."""
    _, proc = submitted
    text = proc.stdout + proc.stderr
    for ours in (r"^\[bc\] \d+/\d+ ", r"^\[rft\] first step: the actors' log-probs against the learner's: mean ratio [01]\.\d+",
                 r"^\[rft\] rollout actors compute in ", r"^\[sft\] learners compute in ", r"^\| stage \| data \|",
                 r"^SFT-RFT-SFT finished in "):
        assert re.search(ours, text, re.M), ours
    for internal in ("Checkpoint successfully created", "Reporting training result", "Started training worker group",
                     "Requesting resources", "has constructor arguments in the object store", "INFO mlflow",
                     "View run "):
        assert internal not in text, internal
    assert not re.search(r"^\(RayTrainWorker pid=[^)]*\) \[", text, re.M), "a progress line with Ray's prefix"
    assert "injected learner failure at 1" in text
