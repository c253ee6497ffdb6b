"""Weights travel through Ray's object store, never as paths: the driver reads a checkpoint once
(CRC-checked) and puts its bytes there; rollout actors (also after a restart) and learners load
them from there, and the stage's final model reaches the driver through the stage's last state."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import ray
import torch

from smart_r1.config import BCStage, RayConfig
from smart_r1.data.parquet import write_shard
from smart_r1.distributed.learner import run_learner
from smart_r1.distributed.worker_kit import weights_ref
from smart_r1.distributed.rollout_worker import start_workers
from smart_r1.distributed.worker_kit import LearnerJob, fetch_checkpoint
from smart_r1.model.checkpoint import checkpoint_bytes, checkpoint_extra, load_checkpoint, save_checkpoint
from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.ray_runtime import ensure_ray
from smart_r1.tokens.motion_vocab import build_vocab


@pytest.fixture(scope="module")
def local_ray():
    ensure_ray(num_cpus=2)
    yield


@pytest.fixture(scope="module")
def data_uri(womd_record, tmp_path_factory) -> str:
    """The real WOMD scenario as a one-shard Parquet folder, named by a file:// URI."""
    folder = tmp_path_factory.mktemp("womd_parquet")
    write_shard(folder / "one.parquet", [womd_record])
    return folder.as_uri()


@pytest.fixture(scope="module")
def model(womd_record) -> SmartTiny:
    torch.manual_seed(0)
    vocab = build_vocab([womd_record], size=16, seed=0)
    return SmartTiny(ModelConfig.preset("test", vocab_size=16), vocab)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def test_checkpoint_bytes_load_and_damage_is_named(model, tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, {"stage": "init"})
    data = checkpoint_bytes(path)
    assert _equal(load_checkpoint(data).state_dict(), model.state_dict())
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF  # a byte inside the weights
    with pytest.raises(ValueError, match="checkpoint bytes"):
        load_checkpoint(bytes(bad))
    path.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="m.pt"):
        checkpoint_bytes(path)


def test_a_learner_never_takes_a_path():
    with pytest.raises(TypeError, match="ObjectRef"):
        fetch_checkpoint("/driver/only/model.pt")


def test_rollout_actors_load_from_the_object_store_also_after_a_restart(local_ray, model, tmp_path):
    path = tmp_path / "init.pt"
    save_checkpoint(path, model)
    (worker,) = start_workers(str(path), {}, count=1, cpus=0.5, gpus=0.0)
    path.unlink()  # the actor (and its restarts) must not need the driver's file

    def held(self):
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    assert _equal(ray.get(worker.__ray_call__.remote(held), timeout=300), model.state_dict())
    pid = ray.get(worker.info.remote())["pid"]
    ray.kill(worker, no_restart=False)
    assert _equal(ray.get(worker.__ray_call__.remote(held), timeout=300), model.state_dict())
    assert ray.get(worker.info.remote())["pid"] != pid, "the actor was restarted"
    ray.kill(worker)


@pytest.mark.slow
def test_learner_starts_from_an_object_ref_and_the_driver_writes_the_stage_model(
        local_ray, model, data_uri, tmp_path):
    path = tmp_path / "init.pt"
    save_checkpoint(path, model, {"stage": "init"})
    init = weights_ref(str(path))
    path.unlink()  # the learner must not read it
    stage = BCStage(name="bc", epochs=1, batch_scenarios=1, steps_per_epoch=1, lr=1e-2)
    job = LearnerJob(stage=stage, stage_dir=str(tmp_path / "bc"), init_checkpoint=init,
                     datasets={"train": data_uri}, run_name="objstore-bc")
    out = run_learner(job, RayConfig(num_learners=1, cpus_per_learner=1, max_learner_failures=0),
                      str(tmp_path / "ray"))
    assert out == str(tmp_path / "bc" / "model.pt")
    trained = load_checkpoint(out)  # whole and CRC-clean: written by the driver from the stage's last state
    assert checkpoint_extra(out)["stage"] == "bc"
    assert not _equal(trained.state_dict(), model.state_dict()), "one BC step changed the weights"

    # A driver killed after rank 0 saved the stage's last state, before it wrote model.pt: the
    # re-run's learner resumes after its last unit from last_state.pt and reports nothing; the
    # stage model is that saved state.
    Path(out).unlink()
    shutil.rmtree(tmp_path / "ray")
    again = run_learner(job, RayConfig(num_learners=1, cpus_per_learner=1, max_learner_failures=0),
                        str(tmp_path / "ray"))
    assert again == out
    assert _equal(load_checkpoint(again).state_dict(), trained.state_dict())
    assert checkpoint_extra(again)["progress"] == 0
