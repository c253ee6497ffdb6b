"""Typed records that flow through the pipeline, with the shape of every array.

Shapes use these names:
    A  number of agents (tracks) in a scenario
    T  number of steps (91 for WOMD: 1.0 s history + current + 8.0 s future at 10 Hz)
    M  number of map features
    P  number of map points (all features concatenated)
    L  number of traffic-light-controlled lanes
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

NUM_STEPS = 91
CURRENT_TIME_INDEX = 10
NUM_FUTURE_STEPS = NUM_STEPS - CURRENT_TIME_INDEX - 1  # 80 simulated steps at 10 Hz
STEP_SECONDS = 0.1

# WOMD Track.ObjectType
OBJECT_TYPE_UNSET, VEHICLE, PEDESTRIAN, CYCLIST, OBJECT_TYPE_OTHER = 0, 1, 2, 3, 4

# Kinds of MapFeature (the proto's oneof), in a stable integer order.
MAP_KINDS = ("lane", "road_line", "road_edge", "stop_sign", "crosswalk", "speed_bump", "driveway")
LANE, ROAD_LINE, ROAD_EDGE, STOP_SIGN, CROSSWALK, SPEED_BUMP, DRIVEWAY = range(1, 8)
MAP_KIND_ID = {name: i + 1 for i, name in enumerate(MAP_KINDS)}

# TrafficSignalLaneState.State; TL_ABSENT marks "this lane has no state at this step".
TL_ABSENT = -1


@dataclass(frozen=True)
class ScenarioRecord:
    """One WOMD scenario as dense numpy arrays.

    Fields (dtype, shape):
        scenario_id: str
        timestamps: float64 [T], seconds
        current_time_index: int, index of the "now" step (10 in WOMD)
        sdc_index: int, index into the agent axis of the self-driving car
        object_id: int64 [A], WOMD track ids
        object_type: int8 [A], VEHICLE / PEDESTRIAN / CYCLIST / OTHER
        xyz: float64 [A, T, 3], box centres in metres (WOMD stores doubles)
        heading: float32 [A, T], radians
        velocity: float32 [A, T, 2], m/s in the world frame
        size: float32 [A, T, 3], length, width, height in metres
        valid: bool [A, T]
        tracks_to_predict: int32 [K], agent indices (up to 8 in WOMD)
        difficulty: int8 [K], WOMD RequiredPrediction.difficulty of each
        objects_of_interest: int64 [I], track ids
        map_id: int64 [M], MapFeature ids
        map_kind: int8 [M], LANE .. DRIVEWAY (see MAP_KINDS)
        map_subtype: int8 [M], the feature's own type enum (LaneType, RoadLineType, RoadEdgeType; 0 else)
        map_speed_limit: float32 [M], lane speed limit in mph (0 for non-lanes)
        map_offsets: int64 [M + 1], feature m owns map_points[map_offsets[m]:map_offsets[m+1]]
        map_points: float64 [P, 3], polyline points, polygon vertices, or the stop-sign position
        tl_lane_id: int64 [L], lanes that carry a traffic-signal state at some step
        tl_state: int8 [T, L], TrafficSignalLaneState.State per step, TL_ABSENT where none
        tl_stop_point: float64 [L, 3], stop point of each controlled lane
    """

    scenario_id: str
    timestamps: np.ndarray
    current_time_index: int
    sdc_index: int
    object_id: np.ndarray
    object_type: np.ndarray
    xyz: np.ndarray
    heading: np.ndarray
    velocity: np.ndarray
    size: np.ndarray
    valid: np.ndarray
    tracks_to_predict: np.ndarray
    difficulty: np.ndarray
    objects_of_interest: np.ndarray
    map_id: np.ndarray
    map_kind: np.ndarray
    map_subtype: np.ndarray
    map_speed_limit: np.ndarray
    map_offsets: np.ndarray
    map_points: np.ndarray
    tl_lane_id: np.ndarray
    tl_state: np.ndarray
    tl_stop_point: np.ndarray

    @property
    def num_agents(self) -> int:
        return int(self.object_id.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.timestamps.shape[0])

    @property
    def sim_agent_mask(self) -> np.ndarray:
        """bool [A]: the agents WOSAC simulates, those valid at the current step."""
        return self.valid[:, self.current_time_index].copy()

    @property
    def sim_agent_ids(self) -> np.ndarray:
        """int64 [S]: track ids of the sim agents, in agent order."""
        return self.object_id[self.sim_agent_mask]

    def map_polyline(self, m: int) -> np.ndarray:
        """float64 [n, 3]: the points of map feature m."""
        return self.map_points[self.map_offsets[m] : self.map_offsets[m + 1]]

    def validate(self) -> "ScenarioRecord":
        """Check shapes, dtypes and values; raise ValueError naming the first problem."""
        a, t = self.num_agents, self.num_steps
        m, l = self.map_id.shape[0], self.tl_lane_id.shape[0]
        expected = {
            "object_type": (a,), "xyz": (a, t, 3), "heading": (a, t), "velocity": (a, t, 2),
            "size": (a, t, 3), "valid": (a, t), "map_kind": (m,), "map_subtype": (m,),
            "map_speed_limit": (m,), "map_offsets": (m + 1,), "tl_state": (t, l),
            "tl_stop_point": (l, 3), "difficulty": self.tracks_to_predict.shape,
        }
        for name, shape in expected.items():
            got = getattr(self, name).shape
            if got != shape:
                raise ValueError(f"scenario {self.scenario_id}: {name} has shape {got}, expected {shape}")
        if t != NUM_STEPS:
            raise ValueError(f"scenario {self.scenario_id}: has {t} steps, WOMD scenarios have {NUM_STEPS}")
        if not 0 <= self.current_time_index < t:
            raise ValueError(f"scenario {self.scenario_id}: current_time_index {self.current_time_index} out of range")
        if a and not 0 <= self.sdc_index < a:
            raise ValueError(f"scenario {self.scenario_id}: sdc_index {self.sdc_index} out of range [0, {a})")
        if self.map_points.ndim != 2 or self.map_points.shape[1] != 3 or self.map_offsets[-1] != self.map_points.shape[0]:
            raise ValueError(f"scenario {self.scenario_id}: map_offsets do not match map_points")
        # Positions must be finite everywhere (WOMD writes -1 or 0 for invalid states, never NaN);
        # the other states only where valid.
        if not np.isfinite(self.xyz).all():
            raise ValueError(f"scenario {self.scenario_id}: non-finite xyz (NaN or inf coordinates)")
        for name in ("heading", "velocity", "size"):
            values = getattr(self, name)[self.valid]
            if not np.isfinite(values).all():
                raise ValueError(f"scenario {self.scenario_id}: non-finite {name} on a valid agent state")
        if not np.isfinite(self.map_points).all():
            raise ValueError(f"scenario {self.scenario_id}: non-finite map point")
        if np.any((self.tracks_to_predict < 0) | (self.tracks_to_predict >= a)):
            raise ValueError(f"scenario {self.scenario_id}: tracks_to_predict index out of range")
        return self

    def replace(self, **changes) -> "ScenarioRecord":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Rollout:
    """Closed-loop rollouts of one scenario's sim agents (S of them, in `sim_agent_ids` order).

    Fields (dtype, shape):
        scenario_id: str
        agent_ids: int64 [S], WOMD track ids
        states: float32 [R, S, 80, 4], (x, y, z, heading) at 10 Hz for steps 11..90, world frame
        tokens: int64 [R, S, 16], the chosen motion tokens (one per 0.5 s)
        log_probs: float32 [R, S, 16], log-probability of each chosen token under the distribution
            it was drawn from (`TokenSelector.log_prob`: the tempered, top-k / top-p filtered
            distribution of a Sampler; the model's own for Greedy and CAT-K)
    """

    scenario_id: str
    agent_ids: np.ndarray
    states: np.ndarray
    tokens: np.ndarray
    log_probs: np.ndarray

    @property
    def num_rollouts(self) -> int:
        return int(self.states.shape[0])

    def validate(self) -> "Rollout":
        r, s = self.states.shape[:2]
        expected = {"agent_ids": (s,), "states": (r, s, NUM_FUTURE_STEPS, 4),
                    "tokens": (r, s, NUM_FUTURE_STEPS // 5), "log_probs": (r, s, NUM_FUTURE_STEPS // 5)}
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"rollout {self.scenario_id}: {name} has shape {getattr(self, name).shape}, expected {shape}")
        if not np.isfinite(self.states).all():
            raise ValueError(f"rollout {self.scenario_id}: non-finite states")
        return self


@dataclass(frozen=True)
class Experience:
    """What a rollout worker returns for one scenario of an RL step (through the object store).

    Agent slots A are those of `scene`, the scene the rollouts were sampled from (sim agents);
    the learner recomputes log-probs on it, so it never reads the dataset.

    Fields (dtype, shape):
        scenario_index: int, index of the scenario in its dataset
        scenario_id: str
        version: int, the policy weights version that produced the rollouts
        scene: SceneBatch (smart_r1.tokens.scene) of this one scenario, B = 1
        tokens: int64 [R, A, 16], sampled motion tokens
        poses: float32 [R, A, 80, 3], (x, y, heading) reached, scene frame
        log_probs: float32 [R, A, 16], log pi_old of the sampled tokens (behaviour policy)
        rewards: float32 [R] (per rollout) or [R, A] (per-agent credit)
        realism: float32 [R], per-rollout realism score (smart_r1.metrics.signals)
        collision: bool [R, A]; offroad: bool [R, A]
        seconds: dict phase name -> seconds spent in the worker (rollout, reward, reference)
        ref_log_probs: float32 [R, A, 16] or None, log pi_ref of the sampled tokens when the worker
            holds the frozen reference (the learner then skips that forward pass)
        numerics: str, what the worker computed log_probs and ref_log_probs in, e.g. 'bfloat16/cpu'
            (`smart_r1.model.precision.numerics`; '' = unknown)
    """

    scenario_index: int
    scenario_id: str
    version: int
    scene: object
    tokens: np.ndarray
    poses: np.ndarray
    log_probs: np.ndarray
    rewards: np.ndarray
    realism: np.ndarray
    collision: np.ndarray
    offroad: np.ndarray
    seconds: dict
    ref_log_probs: np.ndarray | None = None
    numerics: str = ""

    @property
    def num_rollouts(self) -> int:
        return int(self.tokens.shape[0])


@dataclass(frozen=True)
class RolloutFailure:
    """A scenario whose rollout or scoring failed: dropped and counted, never scored as zero."""

    scenario_index: int
    scenario_id: str
    error: str
