"""The PyTorch WOSAC metrics against Waymo's official evaluator, run live in this module.

Cases: the official test submission (32 rollouts) on the real WOMD scenario, 4 perturbed
rollouts of it (noise, agents pushed off the road, forced collisions, red-light runs: one each),
and 4 noisy log-replay rollouts of a SUMO-generated scenario (grid roads: many boxes exactly
parallel, a degenerate case for box geometry). The official results are computed once per
module (the official evaluator takes tens of seconds per case, minutes on a loaded machine).
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
# float32 agreement between two orders of the same sums (values are O(1) to O(10) m)
FLOAT32_REL = 1e-5
FLOAT32_ABS = 1e-6
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


def _shift_sideways(states: np.ndarray, rows, shift: float) -> None:
    """Move agents `rows` of one rollout [S, T, 4] sideways by up to `shift` metres (ramped in)."""
    ramp = np.linspace(0, 1, states.shape[1])
    heading = states[rows, :, 3]
    states[rows, :, 0] += -np.sin(heading) * shift * ramp
    states[rows, :, 1] += np.cos(heading) * shift * ramp


def _run_red_lights(record, states: np.ndarray, rows, speed: float) -> None:
    """Drive agents `rows` of one rollout straight through stop points of lanes with a red light."""
    t0 = CURRENT_TIME_INDEX
    red = [l for l in range(len(record.tl_lane_id)) if np.isin(record.tl_state[t0 + 5 : t0 + 30, l], (1, 4)).all()]
    if not red:
        pytest.skip("the scenario has no lane with a red light in the first seconds")
    # Between steps 10 and 11 the agent is on the stop point: a strict crossing at step 11.
    along = (np.arange(1, states.shape[1] + 1) - 10.5) * 0.1 * speed
    for k, row in enumerate(rows):
        lane = red[k % len(red)]
        points = record.map_polyline(int(np.flatnonzero(record.map_id == record.tl_lane_id[lane])[0]))
        stop = record.tl_stop_point[lane]
        nearest = int(np.argmin(np.linalg.norm(points[:, :2] - stop[:2], axis=1)))
        a, b = points[max(nearest - 1, 0)], points[min(nearest + 1, len(points) - 1)]
        direction = (b - a)[:2] / np.linalg.norm((b - a)[:2])
        states[row, :, 0] = stop[0] + direction[0] * along
        states[row, :, 1] = stop[1] + direction[1] * along
        states[row, :, 2] = stop[2] + 1.0
        states[row, :, 3] = math.atan2(direction[1], direction[0])


def perturbed(record, base: np.ndarray, rng) -> np.ndarray:
    """Four rollouts, one perturbation each (one official call scores them all):
    0: random-walk noise on the official submission's positions and headings (kinematics);
    1: log replay with every evaluated agent pushed 4-12 m sideways (off-road, road-edge distance);
    2: log replay with every evaluated agent driving onto another sim agent (collisions);
    3: log replay with the evaluated agents running red lights (traffic-light violations).
    """
    states = log_replay_states(record, NUM_PERTURBED_ROLLOUTS)
    rows = _eval_rows(record)
    states[0] = base[0]
    states[0, ..., :2] += np.cumsum(rng.normal(0, 0.15, states[0, ..., :2].shape), axis=1)
    states[0, ..., 3] += np.cumsum(rng.normal(0, 0.02, states[0, ..., 3].shape), axis=1)
    for row in rows:
        _shift_sideways(states[1], [row], rng.uniform(4, 12) * rng.choice([-1, 1]))
    others = [s for s in range(states.shape[1]) if s not in set(rows.tolist())]
    blend = np.clip(np.linspace(-0.5, 1.5, states.shape[2]), 0, 1)[:, None]
    for row in rows:
        other = rng.choice(others)
        states[2, row, :, :3] = (1 - blend) * states[2, row, :, :3] + blend * states[2, other, :, :3]
    _run_red_lights(record, states[3], rows, speed=8.0)
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
    """{case: (record, states, official metrics)}.

    The two 4-rollout cases run in parallel Ray tasks (`official_metrics_parallel`), then the
    32-rollout submission in this process (`official_scenario_metrics`).
    """
    from smart_r1.metrics.official import official_metrics_parallel, official_scenario_metrics

    rng = np.random.default_rng(0)
    submission = official_submission_states(womd_record)
    sumo_states = log_replay_states(sumo_record, NUM_PERTURBED_ROLLOUTS)
    sumo_states[..., :2] += np.cumsum(rng.normal(0, 0.2, sumo_states[..., :2].shape), axis=2)
    small = {
        "perturbed": (womd_record, perturbed(womd_record, submission, rng)),
        "sumo": (sumo_record, sumo_states),
    }
    pairs = [(rec, states_to_scenario_rollouts(rec, st)) for rec, st in small.values()]
    out = {name: (*small[name], result)
           for name, result in zip(small, official_metrics_parallel(pairs, num_workers=2))}
    official = official_scenario_metrics(womd_record, states_to_scenario_rollouts(womd_record, submission))
    out["official_submission"] = (womd_record, submission, official)
    return out


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


@pytest.mark.parametrize("case", ["perturbed", "sumo"])
def test_perturbed_rollouts_match(cases, case):
    record, states, official = cases[case]
    _assert_agree(compute_scenario_metrics(record, states), official)


def test_perturbations_exercise_their_feature(cases):
    """Each perturbed rollout must really trigger what it targets, else it tests nothing."""
    from smart_r1.metrics import rollout_signals

    record, states, official = cases["perturbed"]
    signals = rollout_signals(record, states)
    replay = rollout_signals(record, log_replay_states(record, 1))
    evaluated = signals.eval_mask
    assert signals.offroad[1, evaluated].sum() > replay.offroad[0, evaluated].sum()
    assert signals.collision[2, evaluated].all()
    assert official["simulated_traffic_light_violation_rate"] > 0
    assert official["traffic_light_violation_likelihood"] < 0.99


def _assert_float32_close(got: dict, expected: dict) -> None:
    """Equal up to float32 summation order: the batch and a single call reduce in different orders,
    so the last bits differ (1e-7 relative on a 16 m ADE); a padding bug moves values far more."""
    for k in METRIC_FIELDS:
        assert got[k] == pytest.approx(expected[k], rel=FLOAT32_REL, abs=FLOAT32_ABS), k


def test_batch_of_different_scenarios_matches_single_calls(cases):
    """Padding: scenarios with different agent and map sizes in one batch give their own metrics."""
    names = ["official_submission", "sumo", "perturbed"]
    records = [cases[n][0] for n in names]
    states = [cases[n][1][:NUM_PERTURBED_ROLLOUTS] for n in names]
    batched = compute_metrics_batch(records, states)
    for rec, st, got in zip(records, states, batched):
        _assert_float32_close(got, compute_scenario_metrics(rec, st))


def test_padded_agents_never_count(cases):
    """What the padded agent slots hold must not matter: fill them with copies of a real agent of
    the same scenario (so an unmasked pad would collide with it, and shift every interaction
    feature) and the metrics stay those of zero padding. The same edit on a real agent's slot
    does change them, so the comparison can fail."""
    from smart_r1.metrics.context import build_context
    from smart_r1.metrics.wosac import default_specs, evaluate, pad_states

    names = ["sumo", "perturbed"]
    records = [cases[n][0] for n in names]
    states = [cases[n][1][:NUM_PERTURBED_ROLLOUTS] for n in names]
    ctx = build_context(records, "cpu")
    padded = pad_states(records, states, "cpu")
    sizes = [int(r.sim_agent_mask.sum()) for r in records]
    small = int(np.argmin(sizes))
    assert sizes[small] < padded.shape[2], "the batch needs a scenario with padded agent slots"

    def metrics(batch):
        values, _, _ = evaluate(ctx, batch, default_specs())
        return [{k: float(values[k][i]) for k in METRIC_FIELDS} for i in range(len(records))]

    reference = metrics(padded)
    garbage = padded.clone()
    garbage[small, :, sizes[small]:] = padded[small, :, :1]  # every pad sits on agent 0
    for got, expected in zip(metrics(garbage), reference):
        _assert_float32_close(got, expected)

    row = int(_eval_rows(records[small])[0])
    other = 1 if row == 0 else 0
    edited = padded.clone()
    edited[small, :, row] = padded[small, :, other]  # an evaluated agent onto another agent
    changed = metrics(edited)[small]
    assert any(abs(changed[k] - reference[small][k]) > 100 * FLOAT32_REL * max(1.0, abs(reference[small][k]))
               for k in METRIC_FIELDS)


def test_thread_count_does_not_change_metrics(cases):
    """1 and 2 torch threads split reductions differently: only float32 rounding may differ."""
    import torch

    record, states, _ = cases["perturbed"]
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(compute_scenario_metrics(record, states))
    finally:
        torch.set_num_threads(before)
    _assert_float32_close(results[1], results[0])
