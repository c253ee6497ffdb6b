"""States <-> ScenarioRollouts protos, log replay, and the submission rules on bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smart_r1.metrics import (
    compute_scenario_metrics, log_replay_states, scenario_rollouts_to_states, states_to_scenario_rollouts,
)
from smart_r1.metrics.rollouts_io import read_rollouts
from smart_r1.types import CURRENT_TIME_INDEX


@pytest.fixture(scope="module")
def replay(womd_record):
    return log_replay_states(womd_record, 2)


def test_roundtrip_keeps_states_in_sim_agent_order(womd_record, replay):
    proto = states_to_scenario_rollouts(womd_record, torch.as_tensor(replay))
    assert proto.scenario_id == womd_record.scenario_id
    assert [t.object_id for t in proto.joint_scenes[0].simulated_trajectories] == womd_record.sim_agent_ids.tolist()
    # Reversed agent order in the proto comes back in sim-agent order (float32 in the proto).
    for scene in proto.joint_scenes:
        trajectories = list(scene.simulated_trajectories)[::-1]
        del scene.simulated_trajectories[:]
        scene.simulated_trajectories.extend(trajectories)
    back = scenario_rollouts_to_states(womd_record, proto)
    np.testing.assert_allclose(back, replay, rtol=1e-6, atol=1e-3)


def test_log_replay_follows_the_log_and_fills_gaps(womd_record, replay):
    mask = womd_record.sim_agent_mask
    future = slice(CURRENT_TIME_INDEX + 1, None)
    valid = womd_record.valid[mask, future]
    assert replay.shape == (2, mask.sum(), 80, 4)
    np.testing.assert_allclose(replay[0][valid][:, :3], womd_record.xyz[mask, future][valid], atol=1e-9)
    assert not valid.all(), "the real scenario has invalid logged steps to fill"
    assert np.isfinite(replay).all()
    # A filled gap never jumps further than the logged motion around it.
    step = np.linalg.norm(np.diff(replay[0, :, :, :2], axis=1), axis=-1)
    assert step.max() < 5.0
    # Log replay scores a displacement error of zero.
    metrics = compute_scenario_metrics(womd_record, replay)
    assert metrics["min_average_displacement_error"] == pytest.approx(0.0, abs=1e-5)


def _proto(womd_record, replay):
    return states_to_scenario_rollouts(womd_record, replay)


@pytest.mark.parametrize("breakage, message", [
    ("scenario_id", "rollouts are for scenario"),
    ("missing", "are missing"),
    ("extra", "is not a sim agent"),
    ("duplicate", "appears twice"),
    ("short", "has 79 steps"),
    ("nan", "non-finite"),
    ("inf", "non-finite"),
    ("empty", "no joint scene"),
])
def test_bad_rollouts_raise_value_error(womd_record, replay, breakage, message):
    proto = _proto(womd_record, replay)
    trajectories = proto.joint_scenes[0].simulated_trajectories
    if breakage == "scenario_id":
        proto.scenario_id = "not-this-one"
    elif breakage == "missing":
        del trajectories[3]
    elif breakage == "extra":
        trajectories.add().CopyFrom(trajectories[0])
        trajectories[-1].object_id = 10**9
    elif breakage == "duplicate":
        trajectories.add().CopyFrom(trajectories[0])
    elif breakage == "short":
        del trajectories[0].center_x[-1]
    elif breakage == "nan":
        trajectories[1].heading[5] = float("nan")
    elif breakage == "inf":
        trajectories[1].center_y[7] = float("inf")
    elif breakage == "empty":
        del proto.joint_scenes[:]
    with pytest.raises(ValueError, match=message):
        scenario_rollouts_to_states(womd_record, proto)


@pytest.mark.parametrize("shape_change, message", [
    (lambda s: s[:, :-1], "sim agents"),
    (lambda s: s[:, :, :-1], "steps"),
    (lambda s: s[..., :3], "shape"),
])
def test_bad_state_arrays_raise_value_error(womd_record, replay, shape_change, message):
    with pytest.raises(ValueError, match=message):
        compute_scenario_metrics(womd_record, shape_change(replay))
    with pytest.raises(ValueError, match=message):
        states_to_scenario_rollouts(womd_record, shape_change(replay))


def test_non_finite_states_raise_value_error(womd_record, replay):
    broken = replay.copy()
    broken[1, 4, 20, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite center_x in rollout 1"):
        compute_scenario_metrics(womd_record, torch.as_tensor(broken))


def test_read_rollouts_takes_both_proto_kinds(womd_record, replay, tmp_path):
    from waymo_open_dataset.protos import sim_agents_submission_pb2

    proto = _proto(womd_record, replay)
    single = tmp_path / "rollouts.binproto"
    single.write_bytes(proto.SerializeToString())
    submission = sim_agents_submission_pb2.SimAgentsChallengeSubmission()
    other = submission.scenario_rollouts.add()
    other.CopyFrom(proto)
    other.scenario_id = "another"
    submission.scenario_rollouts.add().CopyFrom(proto)
    many = tmp_path / "submission.binproto"
    many.write_bytes(submission.SerializeToString())
    for path in (single, many):
        got = read_rollouts(path, womd_record.scenario_id)
        assert got.scenario_id == womd_record.scenario_id and len(got.joint_scenes) == 2
    with pytest.raises(ValueError, match="no rollouts for scenario"):
        read_rollouts(many, "missing-id")
    with pytest.raises(ValueError, match="holds rollouts of scenario"):
        read_rollouts(single, "missing-id")


def test_reference_policies_stationary_and_constant_velocity(womd_record):
    """The two model-free references beside log replay: a stationary simulation never moves, a
    constant-velocity one moves each agent by its current velocity every step."""
    from smart_r1.metrics.rollouts_io import constant_velocity_states, stationary_states
    from smart_r1.metrics.signals import travel_ratio
    from smart_r1.types import STEP_SECONDS

    still = stationary_states(womd_record, 3)
    log = log_replay_states(womd_record, 3)
    assert still.shape == log.shape and (still == still[:, :, :1]).all()
    assert travel_ratio(womd_record, still) == 0.0
    moving = constant_velocity_states(womd_record, 2)
    sim, now = womd_record.sim_agent_mask, womd_record.current_time_index
    step = np.diff(moving[0, :, :, :2], axis=1)  # [S, 79, 2]
    assert np.allclose(step, womd_record.velocity[sim, now][:, None] * STEP_SECONDS, atol=1e-6)
    assert np.allclose(moving[..., 3], womd_record.heading[sim, now][None, :, None])
