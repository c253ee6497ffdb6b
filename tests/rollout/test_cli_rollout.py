"""The `smart-r1` subcommands of the model issue end to end: build-vocab -> train bc -> rollout."""

from __future__ import annotations

import json

import torch

from smart_r1.cli import main
from smart_r1.model.checkpoint import checkpoint_extra, load_checkpoint


def test_model_info_prints_the_parameter_count(capsys):
    assert main(["model-info", "--preset", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["dim"] == 64 and 300_000 < info["parameters"] < 1_000_000


def test_vocab_train_rollout(tmp_path, womd_path, womd_record, capsys):
    from waymo_open_dataset.protos import sim_agents_submission_pb2

    vocab, ckpt, out = tmp_path / "vocab.pt", tmp_path / "bc.pt", tmp_path / "r.binproto"
    assert main(["build-vocab", "--data", str(womd_path), "--out", str(vocab), "--size", "16"]) == 0
    assert main(["train", "bc", "--data", str(womd_path), "--out", str(ckpt), "--preset", "test",
                 "--vocab", str(vocab), "--epochs", "1", "--batch-size", "1"]) == 0
    model = load_checkpoint(ckpt)
    assert model.cfg.vocab_size == 16 and checkpoint_extra(ckpt)["epoch"] == 0
    assert torch.isfinite(torch.tensor(checkpoint_extra(ckpt)["loss"]))
    assert main(["rollout", "--checkpoint", str(ckpt), "--scenario", str(womd_path), "--num-rollouts", "2",
                 "--out", str(out), "--top-k", "4"]) == 0
    proto = sim_agents_submission_pb2.ScenarioRollouts.FromString(out.read_bytes())
    assert proto.scenario_id == womd_record.scenario_id and len(proto.joint_scenes) == 2
    ids = [t.object_id for t in proto.joint_scenes[0].simulated_trajectories]
    assert ids == womd_record.sim_agent_ids.tolist()
    assert all(len(t.center_x) == 80 for t in proto.joint_scenes[1].simulated_trajectories)
