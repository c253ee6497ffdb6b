"""Rollout actors: a killed actor is restarted and the RFT stage completes without losing any
completed rollout; a failing scenario is dropped and counted, never scored."""

from __future__ import annotations

import json
import threading
import time

import pytest
import ray

from smart_r1.config import MPOStage, RayConfig
from smart_r1.distributed.learner import run_learner
from smart_r1.distributed.worker_kit import LearnerJob
from smart_r1.distributed.mpo_loop import collect
from smart_r1.distributed.rollout_tasks import dispatch
from smart_r1.ray_runtime import ensure_ray
from smart_r1.distributed.rollout_worker import RolloutSpec, start_workers
from smart_r1.types import Experience, RolloutFailure

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ensure_ray(num_cpus=2)
    yield


def test_killed_actor_restarts_and_rft_completes(submitted, local_ray, tmp_path):
    out, proc = submitted
    assert proc.returncode == 0
    datasets = {"train": str(out / "data" / "train")}
    sft = str(out / "sft" / "model.pt")
    workers = start_workers(sft, datasets, count=2, cpus=0.5, gpus=0.0)
    first_pid = ray.get(workers[0].info.remote())["pid"]
    stage = MPOStage(name="rft", steps=4, num_rollouts=2, scenarios_per_step=2, lr=1e-3, alpha="auto")
    job = LearnerJob(stage=stage, stage_dir=str(tmp_path / "rft"), init_checkpoint=sft, datasets=datasets,
                     ref_checkpoint=sft, rollout_workers=workers)
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        ckpt=run_learner(job, RayConfig(num_learners=1, cpus_per_learner=1, max_learner_failures=0),
                         str(tmp_path / "ray"))))
    thread.start()
    log = tmp_path / "rft" / "train_log.jsonl"
    deadline = time.time() + 600
    while not log.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert log.exists(), "the RL stage did not report its first step"
    ray.kill(workers[0], no_restart=False)  # mid-stage: its next (or current) task is retried
    thread.join(timeout=900)
    assert not thread.is_alive() and "ckpt" in result
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(r["scenarios"] == 2 and r["rollouts_failed"] == 0 for r in rows), rows
    # alpha: auto, calibrated on the first batch (the starting policy's mean reward), then fixed
    alpha = json.loads((tmp_path / "rft" / "alpha.json").read_text())["alpha"]
    assert 0.0 < alpha < 1.0 and all(r["alpha"] == alpha for r in rows)
    info = ray.get(workers[0].info.remote())
    assert info["pid"] != first_pid, "the killed actor was restarted in a new process"
    for w in workers:
        ray.kill(w)


def test_failed_scenarios_are_dropped_and_counted(submitted, local_ray):
    out, _ = submitted
    bad = {"train": str(out / "data" / "train")}
    (worker,) = start_workers(str(out / "sft" / "model.pt"), bad, count=1, cpus=0.5, gpus=0.0)
    spec = RolloutSpec(num_rollouts=2)
    # index 10**6 does not exist: that scenario fails inside the actor, the others are scored
    raw = ray.get(worker.rollout.remote(0, [], "train", [0, 10**6, 1], spec))
    assert isinstance(raw[1], RolloutFailure) and "IndexError" in raw[1].error
    experiences, failed = collect(dispatch([worker], "rollout", [0, 10**6, 1], 0, [], "train", spec), timeout_s=300)
    assert failed == 1 and len(experiences) == 2
    assert all(isinstance(e, Experience) and e.rewards.shape == (2,) for e in experiences)
    ray.kill(worker)
