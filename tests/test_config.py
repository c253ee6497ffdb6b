"""Pipeline configs load from YAML, take command-line overrides, and reject bad values early."""

from __future__ import annotations

from pathlib import Path

import pytest

from smart_r1.config import StageConfig, apply_overrides, load_config

DEFAULT = Path(__file__).resolve().parents[1] / "pipelines" / "sft_rft_sft.yaml"


def test_default_config_loads():
    config = load_config(DEFAULT)
    assert [s.kind for s in config.stages] == ["bc", "catk_sft", "mpo", "catk_sft"]
    rft = config.stage("rft")
    # the SUMO preset sets alpha near its SFT policy's reward; the method's defaults are the paper's
    assert rft.alpha == 0.6 and rft.beta == 0.04
    assert StageConfig(name="x", kind="mpo").alpha == 0.77
    assert rft.top_k_sampling == config.eval.top_k  # RFT samples as the evaluation does


def test_overrides():
    config = load_config(DEFAULT, ["rft.alpha=0.8", "rft.per_agent_credit=true", "eval.num_rollouts=4",
                                   "out_dir=/tmp/x"])
    assert config.stage("rft").alpha == 0.8 and config.stage("rft").per_agent_credit is True
    assert config.eval.num_rollouts == 4 and config.out_dir == "/tmp/x"
    # a CPU count written as an integer in YAML may become fractional on the command line
    config = load_config(DEFAULT, ["ray.cpus_per_learner=0.5"])
    assert config.ray.cpus_per_learner == 0.5


@pytest.mark.parametrize("override, message", [
    ("rft.alpha=1.5", "alpha must lie in"),
    ("rft.beta=-0.1", "beta must be >= 0"),
    ("sft.top_k=0", "top_k"),
    ("nosuchstage.alpha=0.5", "unknown stage name 'nosuchstage'"),
    ("rft.nosuchfield=1", "no field 'nosuchfield'"),
    ("data.train=/no/such/path", "data.train: no such path"),
    ("sft.steps_per_epoch=-1", "steps_per_epoch must be >= 0"),
    ("ray.learner_threads=-2", "learner_threads must be >= 0"),
    ("eval.top_k=-1", "eval.top_k must be >= 0"),
    ("rft.collision_weight=-1", "collision_weight and offroad_weight must be >= 0"),
])
def test_invalid_values_fail_clearly(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(DEFAULT, [override])


def test_unknown_kind(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - {name: x, kind: ppo}\n")
    with pytest.raises(ValueError, match="unknown kind 'ppo'"):
        load_config(bad)
    with pytest.raises(ValueError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
