"""Simulated states <-> WOSAC `ScenarioRollouts` protos, and log-replay rollouts.

The array form used everywhere in the project is `states`: float [R, S, 80, 4] with
    R  rollouts (joint scenes; WOSAC submissions have 32)
    S  sim agents, in `record.sim_agent_ids` order (the agents valid at the current step)
    80 simulated steps at 10 Hz (steps 11..90 of the scenario)
    4  x, y, z, heading (metres, radians)

The checks in `scenario_rollouts_to_states` follow the official submission rules
(`waymo_open_dataset.utils.sim_agents.submission_specs.validate_joint_scene`): every sim agent
present exactly once, no other object, 80 steps per field, plus finite values and a matching
scenario id. The number of rollouts is not forced to 32: fewer are useful for tests and rewards.
"""

from __future__ import annotations

import numpy as np
import torch
from waymo_open_dataset.protos import sim_agents_submission_pb2 as submission_pb2

from smart_r1.types import NUM_FUTURE_STEPS, STEP_SECONDS, ScenarioRecord

_FIELDS = ("center_x", "center_y", "center_z", "heading")


def _as_numpy(states) -> np.ndarray:
    if isinstance(states, torch.Tensor):
        states = states.detach().cpu().numpy()
    return np.asarray(states, dtype=np.float64)


def check_states(record: ScenarioRecord, states) -> np.ndarray:
    """Return `states` as float64 [R, S, 80, 4]; ValueError naming the problem when malformed."""
    states = _as_numpy(states)
    num_sim = int(record.sim_agent_mask.sum())
    if states.ndim != 4 or states.shape[3] != 4:
        raise ValueError(f"states must have shape [R, S, {NUM_FUTURE_STEPS}, 4], got {states.shape}")
    if states.shape[0] < 1:
        raise ValueError("states hold no rollout")
    if states.shape[1] != num_sim:
        raise ValueError(f"scenario {record.scenario_id} has {num_sim} sim agents, states have {states.shape[1]}")
    if states.shape[2] != NUM_FUTURE_STEPS:
        raise ValueError(f"states have {states.shape[2]} steps, WOSAC rollouts have {NUM_FUTURE_STEPS}")
    if not np.isfinite(states).all():
        r, s, t, f = np.argwhere(~np.isfinite(states))[0]
        raise ValueError(f"non-finite {_FIELDS[f]} in rollout {r}, agent {record.sim_agent_ids[s]}, step {t}")
    return states


def states_to_scenario_rollouts(record: ScenarioRecord, states) -> submission_pb2.ScenarioRollouts:
    """Pack `states` [R, S, 80, 4] (sim agents in `record.sim_agent_ids` order) into a proto."""
    states = check_states(record, states)
    ids = record.sim_agent_ids.tolist()
    # tolist() once: per-element numpy -> float conversion is the slow part of building protos.
    values = np.moveaxis(states, 3, 2).tolist()  # [R][S][4][80]
    rollouts = submission_pb2.ScenarioRollouts(scenario_id=record.scenario_id)
    for scene_values in values:
        scene = rollouts.joint_scenes.add()
        for object_id, (x, y, z, heading) in zip(ids, scene_values):
            scene.simulated_trajectories.add(object_id=object_id, center_x=x, center_y=y,
                                             center_z=z, heading=heading)
    return rollouts


def scenario_rollouts_to_states(record: ScenarioRecord,
                                rollouts: submission_pb2.ScenarioRollouts) -> np.ndarray:
    """float64 [R, S, 80, 4]: the proto's trajectories reordered to `record.sim_agent_ids`.

    Raises ValueError on a scenario id mismatch, no joint scene, a missing, repeated or extra
    object id, a field without 80 steps, or a non-finite value.
    """
    if rollouts.scenario_id != record.scenario_id:
        raise ValueError(f"rollouts are for scenario {rollouts.scenario_id!r}, "
                         f"the scenario is {record.scenario_id!r}")
    if not rollouts.joint_scenes:
        raise ValueError(f"rollouts for scenario {record.scenario_id} hold no joint scene")
    sim_ids = record.sim_agent_ids.tolist()
    index = {object_id: s for s, object_id in enumerate(sim_ids)}
    states = np.empty((len(rollouts.joint_scenes), len(sim_ids), NUM_FUTURE_STEPS, 4))
    for r, scene in enumerate(rollouts.joint_scenes):
        seen = set()
        for traj in scene.simulated_trajectories:
            if traj.object_id not in index:
                raise ValueError(f"rollout {r}: object {traj.object_id} is not a sim agent of "
                                 f"scenario {record.scenario_id}")
            if traj.object_id in seen:
                raise ValueError(f"rollout {r}: object {traj.object_id} appears twice")
            seen.add(traj.object_id)
            for f, name in enumerate(_FIELDS):
                field = getattr(traj, name)
                if len(field) != NUM_FUTURE_STEPS:
                    raise ValueError(f"rollout {r}, object {traj.object_id}: {name} has {len(field)} "
                                     f"steps, expected {NUM_FUTURE_STEPS}")
                states[r, index[traj.object_id], :, f] = field
        missing = set(sim_ids) - seen
        if missing:
            raise ValueError(f"rollout {r}: sim agents {sorted(missing)} are missing")
    return check_states(record, states)


def log_replay_states(record: ScenarioRecord, num_rollouts: int) -> np.ndarray:
    """float64 [R, S, 80, 4]: the logged future of every sim agent, repeated R times.

    Logged states can be invalid (occluded or out of range). Those steps are filled from the valid
    ones: linearly interpolated between two valid steps (heading along the shorter arc), and held
    at the last valid value after the final valid step. Sim agents are valid at the current step
    (10), so there is always a valid step before any gap.
    """
    t0 = record.current_time_index
    mask = record.sim_agent_mask
    xyz = record.xyz[mask, t0:]  # [S, 81, 3], the current step first
    heading = record.heading[mask, t0:].astype(np.float64)
    valid = record.valid[mask, t0:]
    steps = np.arange(xyz.shape[1])
    out = np.empty((mask.sum(), xyz.shape[1], 4))
    for s in range(out.shape[0]):  # np.interp is 1-D; this runs once per scenario, not per reward
        known = steps[valid[s]]
        for f in range(3):
            out[s, :, f] = np.interp(steps, known, xyz[s, valid[s], f])
        # Unwrapping over valid steps only, so that a gap cannot hide a wrap-around.
        h = np.unwrap(heading[s, valid[s]])
        out[s, :, 3] = np.interp(steps, known, h)
    out[..., 3] = (out[..., 3] + np.pi) % (2 * np.pi) - np.pi
    future = out[:, 1:]  # [S, 80, 4]
    return np.broadcast_to(future, (num_rollouts, *future.shape)).copy()


def read_rollouts(path, scenario_id: str) -> submission_pb2.ScenarioRollouts:
    """The rollouts of `scenario_id` from a binary `ScenarioRollouts` or `SimAgentsChallengeSubmission`.

    A submission's bytes do not parse as `ScenarioRollouts` (its first field is a message, not a
    UTF-8 id; its second a varint, not a message), so the two are told apart by trying.
    """
    from pathlib import Path

    from google.protobuf.message import DecodeError

    data = Path(path).read_bytes()
    try:
        rollouts = submission_pb2.ScenarioRollouts.FromString(data)
        if rollouts.joint_scenes:
            if rollouts.scenario_id != scenario_id:
                raise ValueError(f"{path} holds rollouts of scenario {rollouts.scenario_id!r}, "
                                 f"not {scenario_id!r}")
            return rollouts
    except DecodeError:
        pass
    try:
        submission = submission_pb2.SimAgentsChallengeSubmission.FromString(data)
    except DecodeError as e:
        raise ValueError(f"{path} is neither a ScenarioRollouts nor a SimAgentsChallengeSubmission ({e})") from None
    for rollouts in submission.scenario_rollouts:
        if rollouts.scenario_id == scenario_id:
            return rollouts
    ids = [r.scenario_id for r in submission.scenario_rollouts]
    raise ValueError(f"{path} has no rollouts for scenario {scenario_id!r} (it has {ids[:10]})")


def _current_states(record: ScenarioRecord) -> np.ndarray:
    """float64 [S, 4]: each sim agent's (x, y, z, heading) at the current step."""
    now, sim = record.current_time_index, record.sim_agent_mask
    return np.concatenate([record.xyz[sim, now], record.heading[sim, now][:, None]], -1).astype(np.float64)


def stationary_states(record: ScenarioRecord, num_rollouts: int) -> np.ndarray:
    """float64 [R, S, 80, 4]: every sim agent stays where it is now, a reference policy: what the
    metrics give a simulation that never moves (a realism figure at or below it is no progress)."""
    now = _current_states(record)  # [S, 4]
    return np.broadcast_to(now[None, :, None], (num_rollouts, now.shape[0], NUM_FUTURE_STEPS, 4)).copy()


def constant_velocity_states(record: ScenarioRecord, num_rollouts: int) -> np.ndarray:
    """float64 [R, S, 80, 4]: each sim agent moves on at its current velocity, heading and height."""
    now = _current_states(record)  # [S, 4]
    vel = record.velocity[record.sim_agent_mask, record.current_time_index].astype(np.float64)  # [S, 2]
    t = np.arange(1, NUM_FUTURE_STEPS + 1) * STEP_SECONDS  # [80]
    states = np.broadcast_to(now[:, None], (now.shape[0], NUM_FUTURE_STEPS, 4)).copy()  # [S, 80, 4]
    states[..., :2] += vel[:, None] * t[None, :, None]
    return np.broadcast_to(states, (num_rollouts, *states.shape)).copy()  # [R, S, 80, 4]
