"""The PyTorch WOSAC metrics against Waymo's official evaluator, run live in this module.

Cases: the official test submission (32 rollouts) on the real WOMD scenario, 4 perturbed
rollouts of it (noise, agents pushed off the road, forced collisions, red-light runs: one each),
4 noisy log-replay rollouts of a SUMO-generated scenario (grid roads: many boxes exactly
parallel, a degenerate case for box geometry), and 2 rollouts of the real scenario edited so that
each type- or step-dependent rule of the official features decides a field (`edited_case`). The
official results are computed once per module (the official evaluator takes tens of seconds per
case, minutes on a loaded machine).
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
from smart_r1.types import CURRENT_TIME_INDEX, CYCLIST, PEDESTRIAN, STEP_SECONDS, TL_ABSENT

TOLERANCE = 1e-3
# float32 agreement between two orders of the same sums (values are O(1) to O(10) m)
FLOAT32_REL = 1e-5
FLOAT32_ABS = 1e-6
NUM_PERTURBED_ROLLOUTS = 4
NUM_EDITED_ROLLOUTS = 2

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


def _stop_line(record, lane: int) -> tuple[np.ndarray, np.ndarray]:
    """The stop point [3] of signal lane index `lane` and the lane's unit direction [2] there."""
    points = record.map_polyline(int(np.flatnonzero(record.map_id == record.tl_lane_id[lane])[0]))
    stop = record.tl_stop_point[lane]
    nearest = int(np.argmin(np.linalg.norm(points[:, :2] - stop[:2], axis=1)))
    a, b = points[max(nearest - 1, 0)], points[min(nearest + 1, len(points) - 1)]
    return stop, (b - a)[:2] / np.linalg.norm((b - a)[:2])


def _run_red_lights(record, states: np.ndarray, rows, speed: float) -> None:
    """Drive agents `rows` of one rollout straight through stop points of lanes with a red light."""
    t0 = CURRENT_TIME_INDEX
    red = [l for l in range(len(record.tl_lane_id)) if np.isin(record.tl_state[t0 + 5 : t0 + 30, l], (1, 4)).all()]
    if not red:
        pytest.skip("the scenario has no lane with a red light in the first seconds")
    # Between steps 10 and 11 the agent is on the stop point: a strict crossing at step 11.
    along = (np.arange(1, states.shape[1] + 1) - 10.5) * 0.1 * speed
    for k, row in enumerate(rows):
        stop, direction = _stop_line(record, red[k % len(red)])
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


EDITED_SCENARIO = "637f20cafde22ff8"
# Track ids and signal lanes of that scenario used by `edited_case`.
PEDESTRIAN_ID, CYCLIST_ID, SDC_ID, GAPPY_ID, VEHICLE_ID, LATE_ID = 2320, 2402, 2406, 1676, 1675, 1685
ORIGIN_BOUND_LANE = 431  # heads towards the world origin: far 'behind' the origin's fence


def _lane(record, lane_id: int) -> int:
    return int(np.flatnonzero(record.tl_lane_id == lane_id)[0])


def _through_stop_point(record, lane_id: int, step: int, speed: float, steps: np.ndarray):
    """(xy [len(steps), 2], heading) of a straight run along `lane_id` at `speed` m/s that passes
    its stop point between scenario steps `step - 1` and `step`, 5 cm before the later one.

    Within about 0.3 m past a stop point the official lane search picks the incoming lane (whose
    tail to the padding origin starts there), so a crossing counts only for a run of more than
    that in one step (3 m/s); `speed` must be above it."""
    stop, direction = _stop_line(record, _lane(record, lane_id))
    along = (steps - step + 1) * STEP_SECONDS * speed - 0.05
    return stop[:2] + direction * along[:, None], math.atan2(direction[1], direction[0])


def _past_stop_point(record, lane_id: int, metres: float):
    """(xy [2], heading) of a point `metres` past the stop point of `lane_id`, along the lane."""
    stop, direction = _stop_line(record, _lane(record, lane_id))
    return stop[:2] + direction * metres, math.atan2(direction[1], direction[0])


def _keep_agents(record, rows):
    """`record` with only the agents `rows` (indices), which must include the SDC and the tracks
    to predict. The official evaluator's fixed cost grows with the number of sim agents."""
    rows = np.sort(np.asarray(rows))
    new = {int(r): k for k, r in enumerate(rows)}
    ids = record.object_id[rows]
    return record.replace(
        **{k: getattr(record, k)[rows] for k in ("object_id", "object_type", "xyz", "heading", "velocity", "size", "valid")},
        sdc_index=new[int(record.sdc_index)],
        tracks_to_predict=np.array([new[int(t)] for t in record.tracks_to_predict], np.int32),
        objects_of_interest=record.objects_of_interest[np.isin(record.objects_of_interest, ids)]).validate()


def edited_case(record):
    """(record, states [2, S, 80, 4]): the real scenario edited so that each type- or
    step-dependent rule of the official features decides a field (issue 14).

    Edits of the logged scenario:
    1. the pedestrian stands 3 m past the stop point of lane 431 at every step, and that lane's
       signal is missing at step 13 (STOP at 14): a missing signal's stop point is the world
       origin, far ahead along this lane, so the pedestrian is 'behind' at 13 and 'ahead' at 14:
       a violation in the log and in every rollout in which it is still past the stop point at
       step 14, however it got there (the rate counts every type, the likelihood vehicles only);
    2. the cyclist becomes an evaluated agent (tracks_to_predict), logged riding through the red
       stop point of lane 448 between steps 10 and 11: a non-vehicle crossing at the first
       simulated step, which compares with the logged current step; it is logged valid only
       up to step 44;
    3. the SDC (a vehicle) stands 3 m past the stop point of red lane 443 at every step, but is
       logged invalid at step 30 (stored at the origin, as WOMD does): the log violates at step 31
       (only the validity of the later step counts), standing rollouts never do;
    4. a non-sim agent (invalid at the current step, valid at 44 steps from 15 to 60) is logged on
       top of another evaluated vehicle: only sim agents are objects, in the log features too.
    Of the other agents, only the 10 sim agents nearest the evaluated ones at the current step
    are kept (neighbours for the interaction features; the official evaluator's cost grows with
    the number of agents).
    Rollouts: 0 is the log replay; 1 runs the pedestrian through the red stop point of lane 455 at
    step 20 (counted), and drives vehicle 1676 through the red stop point of lane 445 at step 17
    and the cyclist through that of lane 455 at step 55, both where their log is invalid (masked).
    """
    assert record.scenario_id == EDITED_SCENARIO, "the edits name agents and lanes of the shared scenario"
    row = {int(i): a for a, i in enumerate(record.object_id)}
    steps = np.arange(record.num_steps)
    xyz, heading, valid = record.xyz.copy(), record.heading.copy(), record.valid.copy()
    tl_state = record.tl_state.copy()
    xy, yaw = _past_stop_point(record, ORIGIN_BOUND_LANE, 3.0)
    xyz[row[PEDESTRIAN_ID], :, :2], heading[row[PEDESTRIAN_ID]] = xy, yaw
    tl_state[13, _lane(record, ORIGIN_BOUND_LANE)] = TL_ABSENT
    xyz[row[CYCLIST_ID], :, :2], heading[row[CYCLIST_ID]] = _through_stop_point(
        record, 448, CURRENT_TIME_INDEX + 1, 6.0, steps)
    xy, yaw = _past_stop_point(record, 443, 3.0)
    xyz[row[SDC_ID], :, :2], heading[row[SDC_ID]] = xy, yaw
    valid[row[SDC_ID], 30], xyz[row[SDC_ID], 30], heading[row[SDC_ID], 30] = False, 0.0, 0.0
    xyz[row[LATE_ID]], heading[row[LATE_ID]] = xyz[row[VEHICLE_ID]], heading[row[VEHICLE_ID]]
    edited = record.replace(
        xyz=xyz, heading=heading, valid=valid, tl_state=tl_state,
        tracks_to_predict=np.append(record.tracks_to_predict, row[CYCLIST_ID]).astype(np.int32),
        difficulty=np.append(record.difficulty, 0).astype(record.difficulty.dtype))
    evaluated = [row[int(i)] for i in evaluated_agent_ids(edited)]
    t0 = CURRENT_TIME_INDEX
    others = np.flatnonzero(valid[:, t0] & ~np.isin(np.arange(record.num_agents), evaluated))
    gap = np.linalg.norm(xyz[others, None, t0, :2] - xyz[None, evaluated, t0, :2], axis=-1).min(1)
    edited = _keep_agents(edited, [*evaluated, row[LATE_ID], *others[np.argsort(gap)[:10]]])

    states = log_replay_states(edited, NUM_EDITED_ROLLOUTS)
    sim = {int(i): s for s, i in enumerate(edited.sim_agent_ids)}
    future = steps[CURRENT_TIME_INDEX + 1 :]
    for rollout, agent, lane_id, step, speed in ((1, PEDESTRIAN_ID, 455, 20, 5.0), (1, GAPPY_ID, 445, 17, 8.0),
                                                 (1, CYCLIST_ID, 455, 55, 6.0)):
        xy, yaw = _through_stop_point(edited, lane_id, step, speed, future)
        states[rollout, sim[agent], :, :2], states[rollout, sim[agent], :, 3] = xy, yaw
    return edited, states


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

    Every case is one Ray task of `official_metrics_parallel` on 2 workers: the 32-rollout
    submission first (the longest), the small cases (2-4 rollouts) beside it.
    """
    from smart_r1.metrics.official import official_metrics_parallel

    rng = np.random.default_rng(0)
    submission = official_submission_states(womd_record)
    sumo_states = log_replay_states(sumo_record, NUM_PERTURBED_ROLLOUTS)
    sumo_states[..., :2] += np.cumsum(rng.normal(0, 0.2, sumo_states[..., :2].shape), axis=2)
    cases = {
        "official_submission": (womd_record, submission),
        "perturbed": (womd_record, perturbed(womd_record, submission, rng)),
        "sumo": (sumo_record, sumo_states),
        "edited": edited_case(womd_record),
    }
    pairs = [(rec, states_to_scenario_rollouts(rec, st)) for rec, st in cases.values()]
    return {name: (*cases[name], result)
            for name, result in zip(cases, official_metrics_parallel(pairs, num_workers=2))}


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


@pytest.mark.parametrize("case", ["perturbed", "sumo", "edited"])
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


def test_edits_exercise_their_rule(cases):
    """Each edit of `edited_case` must really decide what it targets, else it tests nothing
    (read from our per-step features, which the test above finds in agreement)."""
    import torch

    from smart_r1.metrics.context import build_context
    from smart_r1.metrics.wosac import default_specs, metrics_and_features

    record, states, official = cases["edited"]
    ctx = build_context([record], "cpu")
    _, log, sim = metrics_and_features(ctx, torch.as_tensor(states, dtype=torch.float32)[None], default_specs())
    ids = evaluated_agent_ids(record).tolist()
    rows = {int(record.object_id[a]): a for a in range(record.num_agents)}
    log_valid = record.valid[:, CURRENT_TIME_INDEX + 1 :]

    def red(features, rollout, agent):  # scenario steps of the agent's violations
        steps = torch.nonzero(features.traffic_light_violation_per_step[0, rollout, ids.index(agent)])[:, 0]
        return (steps + CURRENT_TIME_INDEX + 1).tolist()

    assert record.object_type[rows[PEDESTRIAN_ID]] == PEDESTRIAN and record.object_type[rows[CYCLIST_ID]] == CYCLIST
    # 1. the missing signal: a violation at step 14 that no motion causes
    assert red(log, 0, PEDESTRIAN_ID) == [14] and red(sim, 0, PEDESTRIAN_ID) == [14]
    assert red(sim, 1, PEDESTRIAN_ID) == [20]
    # 2. a cyclist crossing at the first simulated step, counted by the rate only
    assert red(log, 0, CYCLIST_ID) == [11] and red(sim, 0, CYCLIST_ID) == [11]
    # 3. a logged gap: violation at 31 in the log only
    assert red(log, 0, SDC_ID) == [31] and not any(red(sim, r, SDC_ID) for r in range(NUM_EDITED_ROLLOUTS))
    # rollout 1: violations where the log is invalid, which neither the rate nor a likelihood counts
    assert red(sim, 1, GAPPY_ID) == [17] and not log_valid[rows[GAPPY_ID], 17 - CURRENT_TIME_INDEX - 1]
    assert red(sim, 1, CYCLIST_ID) == [55] and not log_valid[rows[CYCLIST_ID], 55 - CURRENT_TIME_INDEX - 1]
    # 4. the late agent overlaps the vehicle in the log, and is no obstacle
    late, vehicle = rows[LATE_ID], rows[VEHICLE_ID]
    assert not record.valid[late, CURRENT_TIME_INDEX] and record.valid[late, CURRENT_TIME_INDEX + 1 :].sum() >= 40
    assert np.array_equal(record.xyz[late, record.valid[late]], record.xyz[vehicle, record.valid[late]])
    assert not log.collision_per_step[0, 0, ids.index(VEHICLE_ID)].any()
    # The official rate counts the pedestrian in both rollouts and the cyclist in the first: 3 of 10.
    assert official["simulated_traffic_light_violation_rate"] == pytest.approx(3 / 10)


def test_evaluated_agent_invalid_at_current_step_is_refused(womd_record):
    """A track to predict that is not valid at the current step is no sim agent: the official
    evaluator fails on it, and so do we (ValueError), rather than scoring something else."""
    from smart_r1.metrics.official import official_scenario_metrics

    row = next(a for a in range(womd_record.num_agents)
               if not womd_record.valid[a, CURRENT_TIME_INDEX] and womd_record.valid[a].any())
    evaluated = [womd_record.sdc_index, *womd_record.tracks_to_predict]
    record = _keep_agents(womd_record.replace(
        tracks_to_predict=np.append(womd_record.tracks_to_predict, row).astype(np.int32),
        difficulty=np.append(womd_record.difficulty, 0).astype(womd_record.difficulty.dtype)), [*evaluated, row])
    states = log_replay_states(record, 1)
    with pytest.raises(ValueError, match="not valid at the current step"):
        compute_scenario_metrics(record, states)
    with pytest.raises(ValueError):
        official_scenario_metrics(record, states_to_scenario_rollouts(record, states))


def _assert_float32_close(got: dict, expected: dict) -> None:
    """Equal up to float32 summation order: the batch and a single call reduce in different orders,
    so the last bits differ (1e-7 relative on a 16 m ADE); a padding bug moves values far more."""
    for k in METRIC_FIELDS:
        assert got[k] == pytest.approx(expected[k], rel=FLOAT32_REL, abs=FLOAT32_ABS), k


def test_batch_of_different_scenarios_matches_single_calls(cases):
    """Padding: scenarios with different agent and map sizes in one batch give their own metrics."""
    names = ["official_submission", "sumo", "perturbed", "edited"]
    records = [cases[n][0] for n in names]
    # The same number of rollouts for all: the edited case's repeated.
    states = [np.take(cases[n][1], np.arange(NUM_PERTURBED_ROLLOUTS) % len(cases[n][1]), axis=0) for n in names]
    batched = compute_metrics_batch(records, states)
    for rec, st, got in zip(records, states, batched):
        _assert_float32_close(got, compute_scenario_metrics(rec, st))


def test_padded_agents_never_count(cases):
    """What the padded agent slots hold must not matter: fill them with copies of a real agent of
    the same scenario (so an unmasked pad would collide with it, and shift every interaction
    feature) and the metrics stay those of zero padding. The same edit on a real agent's slot
    does change them, so the comparison can fail."""
    from smart_r1.metrics.context import build_context
    from smart_r1.metrics.wosac import default_specs, metrics_and_features, pad_states

    names = ["sumo", "perturbed"]
    records = [cases[n][0] for n in names]
    states = [cases[n][1][:NUM_PERTURBED_ROLLOUTS] for n in names]
    ctx = build_context(records, "cpu")
    padded = pad_states(records, states, "cpu")
    sizes = [int(r.sim_agent_mask.sum()) for r in records]
    small = int(np.argmin(sizes))
    assert sizes[small] < padded.shape[2], "the batch needs a scenario with padded agent slots"

    def metrics(batch):
        values, _, _ = metrics_and_features(ctx, batch, default_specs())
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
