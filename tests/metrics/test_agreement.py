"""The PyTorch WOSAC metrics against Waymo's official evaluator, run live in this module.

Cases: the official test submission (32 rollouts) on the real WOMD scenario, then perturbations
with 4 rollouts each (noise, agents pushed off the road, forced collisions, red-light runs) and a
SUMO-generated scenario. The official results of all cases are computed once, in parallel Ray
tasks, by a module fixture (the official evaluator takes tens of seconds per case).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from smart_r1.metrics import (
    METRIC_FIELDS, compute_metrics_batch, compute_scenario_metrics, log_replay_states,
    scenario_rollouts_to_states, states_to_scenario_rollouts,
)
from smart_r1.metrics.context import evaluated_agent_ids
from smart_r1.types import CURRENT_TIME_INDEX

TOLERANCE = 1e-3
NUM_PERTURBED_ROLLOUTS = 4

pytestmark = pytest.mark.slow


def official_submission_states(record) -> np.ndarray:
    """The 32 constant-velocity rollouts of the official test submission, as states."""
    from waymo_open_dataset.protos import scenario_pb2, sim_agents_submission_pb2

    path = (Path(scenario_pb2.__file__).resolve().parents[1] / "utils" / "sim_agents" / "testdata"
            / "test_submission.binproto")
    submission = sim_agents_submission_pb2.SimAgentsChallengeSubmission.FromString(path.read_bytes())
    rollouts = next(r for r in submission.scenario_rollouts if r.scenario_id == record.scenario_id)
    return scenario_rollouts_to_states(record, rollouts)


def _eval_rows(record) -> np.ndarray:
    """Indices into the sim-agent axis of the evaluated agents."""
    ids = record.sim_agent_ids.tolist()
    return np.array([ids.index(i) for i in evaluated_agent_ids(record)])


def noisy(record, base: np.ndarray, rng) -> np.ndarray:
    """Random-walk noise on positions and headings: every kinematic histogram moves."""
    states = base[:NUM_PERTURBED_ROLLOUTS].copy()
    states[..., :2] += np.cumsum(rng.normal(0, 0.15, states[..., :2].shape), axis=2)
    states[..., 3] += np.cumsum(rng.normal(0, 0.02, states[..., 3].shape), axis=2)
    return states


def pushed_off_road(record, rng) -> np.ndarray:
    """Log replay with evaluated agents drifting sideways by up to 2-12 m (off the road)."""
    states = log_replay_states(record, NUM_PERTURBED_ROLLOUTS)
    rows = _eval_rows(record)
    ramp = np.linspace(0, 1, states.shape[2])
    for r in range(states.shape[0]):
        shift = rng.uniform(4, 12) * rng.choice([-1, 1])
        heading = states[r, rows, :, 3]
        states[r, rows, :, 0] += -np.sin(heading) * shift * ramp
        states[r, rows, :, 1] += np.cos(heading) * shift * ramp
    return states


def forced_collisions(record, rng) -> np.ndarray:
    """Log replay where, in some rollouts, an evaluated agent drives onto another sim agent."""
    states = log_replay_states(record, NUM_PERTURBED_ROLLOUTS)
    rows = _eval_rows(record)
    others = [s for s in range(states.shape[1]) if s not in set(rows.tolist())]
    for r in range(1, states.shape[0]):  # rollout 0 stays the log
        ego, other = rng.choice(rows), rng.choice(others)
        blend = np.clip(np.linspace(-0.5, 1.5, states.shape[2]), 0, 1)[:, None]
        states[r, ego, :, :3] = (1 - blend) * states[r, ego, :, :3] + blend * states[r, other, :, :3]
    return states


def red_light_runs(record) -> np.ndarray:
    """Evaluated agents driven straight through the stop points of lanes whose light is red."""
    states = log_replay_states(record, NUM_PERTURBED_ROLLOUTS)
    t0 = CURRENT_TIME_INDEX
    red = [l for l in range(len(record.tl_lane_id)) if np.isin(record.tl_state[t0 + 5 : t0 + 30, l], (1, 4)).all()]
    if not red:
        pytest.skip("the scenario has no lane with a red light in the first seconds")
    steps = np.arange(1, states.shape[2] + 1, dtype=float)
    for k, row in enumerate(_eval_rows(record)):
        lane = red[k % len(red)]
        m = int(np.flatnonzero(record.map_id == record.tl_lane_id[lane])[0])
        points = record.map_polyline(m)
        stop = record.tl_stop_point[lane]
        nearest = int(np.argmin(np.linalg.norm(points[:, :2] - stop[:2], axis=1)))
        a, b = points[max(nearest - 1, 0)], points[min(nearest + 1, len(points) - 1)]
        direction = (b - a)[:2] / np.linalg.norm((b - a)[:2])
        for r in range(states.shape[0]):
            speed = 6.0 + 2.0 * r  # m/s; crosses the stop point at step 10 (1 s in)
            along = (steps - 10.5) * 0.1 * speed  # between steps: a strict crossing
            states[r, row, :, 0] = stop[0] + direction[0] * along
            states[r, row, :, 1] = stop[1] + direction[1] * along
            states[r, row, :, 2] = stop[2] + 1.0
            states[r, row, :, 3] = math.atan2(direction[1], direction[0])
    return states


@pytest.fixture(scope="module")
def sumo_record(tmp_path_factory):
    sumo = pytest.importorskip("smart_r1.data.sumo")
    from smart_r1.data.womd import read_scenarios

    out = tmp_path_factory.mktemp("sumo")
    sumo.make_dataset(out, num_scenarios=1, seed=3, scenarios_per_file=1)
    return next(read_scenarios(next(Path(out).glob("*.tfrecord*"))))


@pytest.fixture(scope="module")
def cases(womd_record, sumo_record):
    """{case: (record, states, official metrics)}, official metrics from parallel Ray tasks."""
    from smart_r1.metrics.official import official_metrics_parallel

    rng = np.random.default_rng(0)
    submission = official_submission_states(womd_record)
    sumo_states = log_replay_states(sumo_record, NUM_PERTURBED_ROLLOUTS)
    sumo_states[..., :2] += np.cumsum(rng.normal(0, 0.2, sumo_states[..., :2].shape), axis=2)
    inputs = {
        "official_submission": (womd_record, submission),
        "noise": (womd_record, noisy(womd_record, submission, rng)),
        "off_road": (womd_record, pushed_off_road(womd_record, rng)),
        "collisions": (womd_record, forced_collisions(womd_record, rng)),
        "red_lights": (womd_record, red_light_runs(womd_record)),
        "sumo": (sumo_record, sumo_states),
    }
    pairs = [(rec, states_to_scenario_rollouts(rec, st)) for rec, st in inputs.values()]
    official = official_metrics_parallel(pairs, num_workers=2)
    return {name: (*inputs[name], result) for name, result in zip(inputs, official)}


def _assert_agree(ours: dict, official: dict) -> None:
    assert set(ours) == set(METRIC_FIELDS)
    deviations = {k: abs(ours[k] - official[k]) for k in METRIC_FIELDS}
    bad = {k: (ours[k], official[k]) for k, d in deviations.items() if not d <= TOLERANCE}
    assert not bad, f"fields off by more than {TOLERANCE} (ours, official): {bad}"


def test_official_submission_matches(cases):
    record, states, official = cases["official_submission"]
    assert official["simulated_collision_rate"] == pytest.approx(0.6875)  # the published figures
    assert official["metametric"] == pytest.approx(0.25824, abs=1e-4)
    _assert_agree(compute_scenario_metrics(record, states), official)


@pytest.mark.parametrize("case", ["noise", "off_road", "collisions", "red_lights", "sumo"])
def test_perturbed_rollouts_match(cases, case):
    record, states, official = cases[case]
    _assert_agree(compute_scenario_metrics(record, states), official)


def test_perturbations_exercise_their_feature(cases):
    """Each perturbed case must really move the metric it targets, else it tests nothing."""
    base = cases["official_submission"][2]
    assert cases["off_road"][2]["simulated_offroad_rate"] >= 0.5
    assert cases["collisions"][2]["simulated_collision_rate"] >= 0.5
    assert cases["red_lights"][2]["simulated_traffic_light_violation_rate"] > 0
    assert cases["noise"][2]["linear_acceleration_likelihood"] != pytest.approx(base["linear_acceleration_likelihood"])


def test_batch_of_different_scenarios_matches_single_calls(cases):
    """Padding: scenarios with different agent and map sizes in one batch give their own metrics."""
    names = ["official_submission", "sumo", "collisions"]
    records = [cases[n][0] for n in names]
    states = [cases[n][1][:NUM_PERTURBED_ROLLOUTS] for n in names]
    batched = compute_metrics_batch(records, states)
    for rec, st, got in zip(records, states, batched):
        single = compute_scenario_metrics(rec, st)
        for k in METRIC_FIELDS:
            assert got[k] == pytest.approx(single[k], abs=1e-6), k
