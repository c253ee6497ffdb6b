"""Crashes at any point, for real: the driver's whole process group is SIGKILLed during RFT, and
during the generation and the preprocessing of the data. Each re-run resumes: no RL step is logged
twice or skipped, a finished stage is kept (and scored on a set named since), every stage ends with
its checkpoint, and the generated data is the full, valid set. While these local runs work (each
driver starts its own Ray, as `make run` does), every socket their processes listen on is watched:
loopback only. (A supervised stage's learners resume from the same state after a failure:
test_pipeline.py's learner failure drill; a job's driver killed mid-RFT on a cluster whose state is
in a bucket, and a learner's node lost: test_multinode.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from smart_r1.data.dataset import iter_scenarios
from smart_r1.storage import read_jsonl

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "pipelines" / "sft_rft_sft.py"

pytestmark = pytest.mark.slow


def _start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A driver in its own process group (it starts Ray's processes in it too)."""
    return subprocess.Popen([sys.executable, *argv], stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready, watch, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while not ready():
        watch.sample(proc.pid)
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the kill point")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("the kill point was not reached in time")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _finish(proc: subprocess.Popen, watch, timeout_s: float) -> int:
    deadline = time.time() + timeout_s
    while proc.poll() is None:
        watch.sample(proc.pid)
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"the run did not finish within {timeout_s:.0f} s")
        time.sleep(0.2)
    return proc.returncode


def _local_env() -> dict:
    """As `make run` starts a driver: no cluster to join, Ray's own default for token auth."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}


def _rows(out: Path, stage: str) -> list[dict]:
    return read_jsonl(out / stage / "train_log.jsonl")


def test_pipeline_killed_in_rft_resumes_without_redoing(submitted, tiny_config, socket_watch, tmp_path):
    done_run, _ = submitted  # its data and its BC model are reused: this test is about the later stages
    out = tmp_path / "run"
    # two RL steps: killed after the first, the re-run must do the second only; evaluation (one
    # scenario) is not what this test is about, beyond a set named only by the re-run (the finished
    # SFT is scored on it, not redone). Generated sets: those of the done run.
    config = tiny_config(tmp_path / "crash.yaml", out, init_checkpoint=str(done_run / "bc" / "model.pt"),
                         data={"train": str(done_run / "data" / "train"), "generated_root": str(done_run),
                               "heldout": str(done_run / "data" / "sumo_heldout"), "real": ""},
                         eval={"num_rollouts": 2, "max_scenarios": 1, "datasets": "heldout"},
                         stages=[{"name": "sft", "kind": "catk_sft", "epochs": 1, "batch_scenarios": 4, "catk_k": 3},
                                 {"name": "rft", "kind": "mpo", "steps": 2, "num_rollouts": 2,
                                  "scenarios_per_step": 2, "lr": 1e-3, "checkpoint_every": 1}])
    env = _local_env()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = tmp_path / "driver.log"
    argv = [str(SCRIPT), "--config", str(config)]
    proc = _start(argv, env, log)  # killed mid-RFT: after its first saved state, before it is done
    _kill_when(proc, lambda: len(_rows(out, "rft")) >= 1 and not (out / "rft" / "done.json").exists()
               and (out / "rft" / "last_state.pt").exists(), socket_watch)
    assert not (out / "rft" / "done.json").exists() and (out / "sft" / "done.json").exists()
    finished = (out / "sft" / "model.pt").stat().st_mtime
    proc = _start([*argv, "--set", "eval.datasets=heldout,sumo_heldout"], env, log)
    assert _finish(proc, socket_watch, timeout_s=900) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "[bc]" not in text  # started from the given checkpoint
    for stage, units in (("sft", 1), ("rft", 2)):
        assert [r["progress"] for r in _rows(out, stage)] == list(range(units)), stage  # once each, none skipped
        assert (out / stage / "done.json").exists() and (out / stage / "model.pt").exists()
    assert "[rft] resuming after step" in text
    assert "[sft] already finished" in text
    assert "[sft] scoring the finished stage on sumo_heldout\n" in text
    assert (out / "sft" / "model.pt").stat().st_mtime == finished, "a finished stage was redone"
    assert (out / "sft" / "scores_sumo_heldout.json").exists()
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["sft", "rft"]
    assert all(sorted(results[s]) == ["heldout", "sumo_heldout"] for s in results), results
    # both runs, as they worked: Ray's daemons, the rollout actors, the learners with their
    # process group (torch.distributed's store) listened on loopback only, with token auth on
    print("listening sockets of the runs:\n" + socket_watch.table())
    socket_watch.assert_local(("gcs_server", "raylet", "ray::RolloutWorker"), learner="ray::RayTrainWorker")


def test_killed_data_generation_and_preprocessing_are_redone_whole(tmp_path, socket_watch):
    from smart_r1.data.sumo import complete_dataset

    out = tmp_path / "run"
    heldout = tmp_path / "heldout"  # given, so only the train set is generated (never read here)
    heldout.mkdir()
    (heldout / "unused.tfrecord").touch()
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump({"out_dir": str(out), "data": {
        "embedded_train_scenarios": 6, "heldout": str(heldout), "real": ""},
        "model": {"preset": "test", "vocab_size": 64}, "stages": [{"name": "bc", "kind": "bc"}]}))
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from pathlib import Path; "
            "from smart_r1.config import load_config; from smart_r1.distributed.pipeline import prepare_data; "
            "c = load_config(sys.argv[1]); print(prepare_data(c, Path(c.out_dir)), flush=True)")
    argv = ["-c", code, str(config), str(REPO)]
    env = _local_env()
    log = tmp_path / "prepare.log"
    raw, parquet = out / "data" / "train_raw", out / "data" / "train"
    # during generation (TFRecords being written), then during preprocessing (shards being written)
    _kill_when(_start(argv, env, log), lambda: raw.exists(), socket_watch)
    assert not (raw / "dataset.json").exists()
    _kill_when(_start(argv, env, log), lambda: parquet.exists(), socket_watch)
    assert _finish(_start(argv, env, log), socket_watch, timeout_s=600) == 0, log.read_text()[-3000:]
    # the whole set, once: generation after a kill is a fresh make_dataset (its bytes are a function
    # of the seed: test_sumo), so a leftover of a killed run would show as extra or missing
    # scenarios; the Parquet set holds exactly the TFRecords' scenarios, in order
    assert complete_dataset(raw, 6, seed=0)
    expected = [r.scenario_id for r in iter_scenarios(raw)]
    assert len(expected) == len(set(expected)) == 6
    assert [r.scenario_id for r in iter_scenarios(parquet)] == expected
    assert not list(out.rglob("*.tmp")), "no temporary file is left behind"
    # preprocessing's own local Ray (its tasks come and go too fast to be sure to be seen)
    socket_watch.assert_local(("gcs_server", "raylet"))
