"""One storage root for a run, local or in a bucket: the tiny pipeline with `out_dir` an `s3://`
URI on moto's S3 server (127.0.0.1) keeps every artefact there (init.pt, run records, each
stage's done marker, model, metrics, log and state, Ray Train's checkpoints, tables) and writes
nothing to a local run folder; a driver killed mid-RFT is followed by a new driver in another
working directory, which resumes from the bucket without redoing a finished stage or step.
The embedded SUMO data of such a run is generated into the bucket once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from smart_r1.config import load_config
from smart_r1.distributed.run_identity import INIT, branch, check_run, record_stage
from smart_r1.storage import (copy_tree, exists, join, list_names, read_bytes, read_json, read_jsonl,
                              resolve, write_bytes, write_log_row)

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "pipelines" / "tiny.yaml"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def bucket(moto_s3):
    """A function giving the URI of a fresh prefix in the bucket on moto's S3 server
    (tests/conftest.py). Credentials come from the environment, as on a cluster with an instance
    role (drivers and the Ray workers they start inherit it)."""
    saved = {k: os.environ.get(k) for k in KEYS}
    os.environ.update(KEYS)
    try:
        yield lambda prefix: f"s3://smart-r1/{prefix}?{moto_s3}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _mtime(uri: str):
    fs, key = resolve(uri)
    return fs.get_file_info(key).mtime


def test_run_records_log_rows_and_branches_in_a_bucket(bucket, tmp_path):
    """Run identity, the stage log and folder copies on S3 (no Ray)."""
    out = bucket("identity/run")
    config = load_config(TINY, [f"out_dir={out}"])
    write_bytes(join(out, "init.pt"), b"init")
    record_stage(config, INIT)
    for stage in config.stages:
        write_bytes(join(out, stage.name, "model.pt"), stage.name.encode())
        record_stage(config, stage.name)
    write_bytes(join(out, "ray", "state.json"), b"{}")
    check_run(config)
    assert list_names(out) == ["bc", "init.pt", "ray", "rft", "run.json", "sft", "sft_final"]
    with pytest.raises(ValueError, match=r"stage 'rft' was made with different stages\.rft\.alpha") as e:
        check_run(load_config(TINY, [f"out_dir={out}", "rft.alpha=0.5"]))
    assert "s3://smart-r1/identity/run" in str(e.value)
    new = bucket("identity/branch")
    branched = branch(load_config(TINY, [f"out_dir={out}", "sft_final.lr=1e-5"]), new)
    assert branched.out_dir == new
    assert read_bytes(join(new, "rft", "model.pt")) == b"rft" and not exists(join(new, "sft_final"))
    assert not exists(join(new, "ray")), "Ray Train's state stays with its run"
    assert exists(join(out, "sft_final", "model.pt")), "the old run is untouched"
    log = join(out, "bc", "train_log.jsonl")
    for step in (0, 1, 1):
        write_log_row(log, {"progress": step, "loss": float(step)})
    assert [r["progress"] for r in read_jsonl(log)] == [0, 1]
    copy_tree(out, tmp_path / "local", skip=("ray",))
    assert (tmp_path / "local" / "bc" / "train_log.jsonl").exists()


def _driver(cwd: Path, argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A pipeline driver in its own process group (its local Ray's processes join it)."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, str(REPO / "pipelines" / "sft_rft_sft.py"), *argv], cwd=cwd,
                            stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


@pytest.mark.slow
def test_embedded_data_is_generated_into_the_bucket_once(bucket, monkeypatch):
    from smart_r1.data.dataset import count_scenarios
    from smart_r1.distributed import pipeline

    train = bucket("generated/data/train")
    assert pipeline.generate_into_store(train, "train", 2, seed=3) == train
    assert count_scenarios(train) == 2
    assert read_json(join(train, "generated.json")) == {"scenarios": 2, "seed": 3}
    assert read_json(join(train, "preprocess_report.json"))["scenarios"] == 2
    monkeypatch.setattr(pipeline, "make_dataset", lambda *a, **k: pytest.fail("a finished set was remade"))
    pipeline.generate_into_store(train, "train", 2, seed=3)


@pytest.mark.slow
def test_pipeline_on_a_bucket_resumes_from_another_working_directory(bucket, womd_record, tmp_path):
    from mlflow.tracking import MlflowClient

    from smart_r1.data.parquet import write_shard
    from smart_r1.model.checkpoint import load_checkpoint
    from smart_r1.tracking.mlflow_runs import EXPERIMENT

    # the data in the bucket too (the real WOMD scenario as one shard), as on a cluster
    data = bucket("data/womd")
    write_shard(join(data, "one.parquet"), [womd_record])
    # MLflow in a store of its own, its artifacts outside the drivers' working directories
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking)
    client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    # pipelines/tiny.yaml's BC and RFT stages, one batch per epoch, 3 RL steps
    config = yaml.safe_load(TINY.read_text())
    config["stages"] = [s for s in config["stages"] if s["name"] in ("bc", "rft")]
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    out = bucket("runs/tiny")
    argv = ["--config", str(tmp_path / "tiny.yaml"), "--out-dir", out,
            "--set", f"data.train={data}", "--set", f"data.heldout={data}", "--set", "eval.num_rollouts=2",
            "--set", "bc.steps_per_epoch=1", "--set", "rft.steps=3", "--set", "rft.scenarios_per_step=1",
            "--set", "rft.num_rollouts=2", "--set", "rft.alpha=auto"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(KEYS, MLFLOW_TRACKING_URI=tracking, PYTHONPATH=str(REPO))
    log = tmp_path / "driver.log"
    first, second = tmp_path / "first", tmp_path / "second"

    # the first driver is killed during RFT, after its first step's state reached the bucket
    proc = _driver(first, argv, env, log)
    rft = join(out, "rft")
    deadline = time.time() + 900
    while not (read_jsonl(join(rft, "train_log.jsonl")) and exists(join(rft, "last_state.pt"))):
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before RFT:\n{log.read_text()[-4000:]}"
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"RFT did not start in time:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not exists(join(rft, "done.json"))
    finished = _mtime(join(out, "bc", "model.pt"))

    # a new driver in another working directory resumes from the bucket
    proc = _driver(second, argv, env, log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "[bc] already finished" in text and text.count("[bc] bc from") == 1
    assert _mtime(join(out, "bc", "model.pt")) == finished, "BC was redone"
    assert "[rft] resuming after step" in text
    assert text.count("[init] vocabulary") == 1, "init.pt was remade"

    for stage, units in (("bc", 1), ("rft", 3)):
        assert read_json(join(out, stage, "done.json"))["checkpoint"] == "model.pt"
        assert read_json(join(out, stage, "metrics.json"))["heldout"]["scenarios"] == 1
        assert len(read_json(join(out, stage, "scores_heldout.json"))["records"]) == 1
        assert [r["progress"] for r in read_jsonl(join(out, stage, "train_log.jsonl"))] == list(range(units)), stage
        load_checkpoint(read_bytes(join(out, stage, "model.pt")))  # whole and CRC-clean
        assert exists(join(out, stage, "last_state.pt")) and exists(join(out, stage, "rollout.png"))
    assert read_json(join(out, "rft", "alpha.json"))["auto"] is True
    assert list(read_json(join(out, "results.json"))) == ["bc", "rft"]
    for name in ("config.json", "run.json", "init.pt", "mlflow_run_id", "results.md"):
        assert exists(join(out, name)), name
    assert any(n.startswith("tiny-rft-") for n in list_names(join(out, "ray"))), "Ray Train's storage is in the root"

    # nothing on the drivers' disks: their working directories stay empty, no local run folder
    assert list(first.iterdir()) == [] and list(second.iterdir()) == []

    # one MLflow run across both drivers, its stages nested under it
    run_id = read_bytes(join(out, "mlflow_run_id")).decode().strip()
    assert client.get_run(run_id).info.status == "FINISHED"
    children = client.search_runs([client.get_run(run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    assert {r.info.run_name for r in children} == {"bc", "rft"}
    finished_rft = [r for r in children if r.info.run_name == "rft" and r.info.status == "FINISHED"]
    assert "metrics.json" in {a.path for a in client.list_artifacts(finished_rft[0].info.run_id)}
