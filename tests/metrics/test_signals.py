"""RL signals, dataset aggregation, estimator edge cases, the CLI, and CPU/CUDA agreement."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from smart_r1.metrics import (
    METRIC_FIELDS, aggregate_metrics, compute_scenario_metrics, log_replay_states, rollout_signals,
)
from smart_r1.metrics.estimators import FeatureSpec, bin_index, log_likelihood


@pytest.fixture(scope="module")
def states(womd_record):
    """Log replay with growing noise per rollout, and one agent pushed onto another in rollout 2."""
    rng = np.random.default_rng(1)
    states = log_replay_states(womd_record, 3)
    for r in range(3):
        states[r, ..., :2] += np.cumsum(rng.normal(0, 0.1 * r, states[r, ..., :2].shape), axis=1)
    states[2, 0, :, :3] = states[2, 1, :, :3]
    return states


def test_signals_agree_with_scenario_metrics(womd_record, states):
    signals = rollout_signals(womd_record, torch.as_tensor(states))
    r, s = states.shape[:2]
    assert signals.collision.shape == signals.offroad.shape == (r, s)
    assert signals.realism.shape == (r,)
    metrics = compute_scenario_metrics(womd_record, states)
    evaluated = signals.eval_mask
    assert int(evaluated.sum()) == 4  # the SDC and three tracks to predict
    assert signals.collision[:, evaluated].float().mean().item() == pytest.approx(metrics["simulated_collision_rate"])
    assert signals.offroad[:, evaluated].float().mean().item() == pytest.approx(metrics["simulated_offroad_rate"])
    # Agents 0 and 1 share a position in rollout 2: both collide there.
    assert signals.collision[2, 0] and signals.collision[2, 1]


def test_realism_is_the_single_rollout_metametric(womd_record, states):
    signals = rollout_signals(womd_record, states)
    for r in range(states.shape[0]):
        alone = compute_scenario_metrics(womd_record, states[r : r + 1])
        assert signals.realism[r].item() == pytest.approx(alone["metametric"], rel=1e-5, abs=1e-6)
    assert ((signals.realism > 0) & (signals.realism < 1)).all()
    # The noise-free log replay is the most realistic rollout.
    assert int(signals.realism.argmax()) == 0


def test_aggregate_matches_the_official_aggregation(womd_record, states):
    from smart_r1.metrics.official import aggregate_official

    per_scenario = [compute_scenario_metrics(womd_record, states[r : r + 1]) for r in range(3)]
    per_scenario[1]["simulated_offroad_rate"] = 0.5  # make sure a field varies
    ours = aggregate_metrics(per_scenario)
    official = aggregate_official(per_scenario)
    for k in METRIC_FIELDS:
        assert ours[k] == pytest.approx(official[k], rel=1e-5, abs=1e-6), k


def test_histogram_binning_follows_tfp():
    spec = FeatureSpec("x", "histogram", 0.0, 25.0, 10, 0.1, True, 1.0)
    values = torch.tensor([float("nan"), 0.0, 25.0, 2.5, 24.99, 12.5, -3.0, 99.0])
    # Right-open bins, the last closed, NaN counted in the last bin (what tfp.stats.histogram does).
    assert bin_index(values, spec).tolist() == [9, 0, 9, 1, 9, 5, 0, 9]
    log = torch.tensor([[1.0]])
    sim = torch.tensor([[[1.0]], [[1.0]], [[20.0]]])  # R = 3 samples of one object, one step
    expected = np.log((2 + 0.1) / (3 + 10 * 0.1))
    assert log_likelihood(log, sim, spec).item() == pytest.approx(expected, rel=1e-6)


def test_cli_prints_official_field_names(womd_path, womd_record, states, tmp_path, capsys):
    from smart_r1.cli import main
    from smart_r1.metrics import states_to_scenario_rollouts

    path = tmp_path / "r.binproto"
    path.write_bytes(states_to_scenario_rollouts(womd_record, states).SerializeToString())
    assert main(["metrics", "--scenario", str(womd_path), "--rollouts", str(path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = compute_scenario_metrics(womd_record, states)
    assert printed["scenario_id"] == womd_record.scenario_id
    for k in METRIC_FIELDS:
        assert printed[k] == pytest.approx(expected[k], abs=1e-6)
    assert main(["metrics", "--scenario", str(womd_path), "--rollouts", str(womd_path)]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(womd_record, states):
    cpu = compute_scenario_metrics(womd_record, torch.as_tensor(states))
    cuda = compute_scenario_metrics(womd_record, torch.as_tensor(states, device="cuda"))
    for k in METRIC_FIELDS:
        assert cuda[k] == pytest.approx(cpu[k], abs=1e-4), k
    signals = rollout_signals(womd_record, torch.as_tensor(states, device="cuda"))
    assert signals.realism.device.type == "cuda"


def test_travel_ratio_measures_how_far_agents_go_against_the_log(womd_record):
    from smart_r1.metrics.signals import travel_ratio

    states = log_replay_states(womd_record, 2)
    assert travel_ratio(womd_record, states) == pytest.approx(1.0, abs=1e-9)
    now = states[..., :1, :2]  # each agent at its first simulated step, from then on at half the pace
    slow = states.copy()
    slow[..., :2] = now + 0.5 * (states[..., :2] - now)
    assert 0.45 < travel_ratio(womd_record, slow) < 0.6
    parked = womd_record.replace(xyz=np.repeat(womd_record.xyz[:, :1], womd_record.num_steps, axis=1))
    assert travel_ratio(parked, states) is None  # the log does not move: no ratio
