"""Everything the metrics need from the logged scenarios, as padded tensors (built once per batch).

Shapes: B scenarios, S sim agents (padded to the largest scenario), E evaluated agents (padded),
T = 80 simulated steps, L traffic-signal lanes (padded).

What follows the official evaluator here:
- sim agents are the agents valid at the current step, in `record.sim_agent_ids` order;
- evaluated agents are the SDC plus `tracks_to_predict`, sorted by object id;
- box sizes of every future step are the logged size at the current step;
- kinematic features of the first simulated steps use the two logged steps before them;
- positions are float32, as the official code gets them from the protos.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from smart_r1.metrics.polylines import SegmentSet, build_segments, search_distance, stack_segments
from smart_r1.types import LANE, NUM_FUTURE_STEPS, ROAD_EDGE, TL_ABSENT, ScenarioRecord

# Official constants (map_metric_features.py, traffic_light_features.py, map.proto).
ROAD_EDGE_Z_STRETCH = 3.0
CYCLIC_TOLERANCE_M2 = 1.0
LANE_TYPE_SURFACE_STREET = 2
STOP_STATES = (1, 4)  # LANE_STATE_ARROW_STOP, LANE_STATE_STOP
PREFIX_STEPS = 2  # logged steps prepended to the simulated ones for central differences


@dataclass(frozen=True)
class MetricContext:
    """Logged data of B scenarios for scoring rollouts.

    Fields:
        scenario_ids: tuple of B str
        agent_mask: bool [B, S], real sim agents (False for padding)
        eval_index: int64 [B, E], evaluated agents as indices into the S axis (0 for padding)
        eval_mask: bool [B, E], real evaluated agents
        is_vehicle: bool [B, S]
        size: float32 [B, S, 3], length, width, height at the current step
        prefix_xyz: float32 [B, S, 2, 3], logged positions at steps 9 and 10
        prefix_heading: float32 [B, S, 2]
        log_xyz: float32 [B, S, T, 3], logged future (steps 11..90; garbage where invalid)
        log_heading: float32 [B, S, T]
        log_valid: bool [B, S, T]
        valid_steps: float32 [B, E], logged valid steps over all 91 steps (the official ADE divisor)
        road_edges: SegmentSet of road-edge polylines (3D search, z stretched)
        lanes: SegmentSet of surface-street lane centres (the official 2D lane search)
        tl_lane_id: int64 [B, L], lanes with a traffic signal
        tl_lane_known: bool [B, L], the signal's lane is one of `lanes` (else never violated)
        tl_stop: bool [B, T + 1, L], signal in a STOP state at steps 10..90
        tl_fence_start: float32 [B, T + 1, L, 2], start of the lane segment nearest the stop point
            at steps 10..90 (nearest the world origin where the signal is absent at that step)
        tl_fence_dir: float32 [B, T + 1, L, 2], that segment's direction (end - start)
        tl_stop_t: float32 [B, T + 1, L], the stop point's position along that segment
    """

    scenario_ids: tuple[str, ...]
    agent_mask: torch.Tensor
    eval_index: torch.Tensor
    eval_mask: torch.Tensor
    is_vehicle: torch.Tensor
    size: torch.Tensor
    prefix_xyz: torch.Tensor
    prefix_heading: torch.Tensor
    log_xyz: torch.Tensor
    log_heading: torch.Tensor
    log_valid: torch.Tensor
    valid_steps: torch.Tensor
    road_edges: SegmentSet
    lanes: SegmentSet
    tl_lane_id: torch.Tensor
    tl_lane_known: torch.Tensor
    tl_stop: torch.Tensor
    tl_fence_start: torch.Tensor
    tl_fence_dir: torch.Tensor
    tl_stop_t: torch.Tensor

    @property
    def batch_size(self) -> int:
        return len(self.scenario_ids)

    @property
    def device(self) -> torch.device:
        return self.size.device


def evaluated_agent_ids(record: ScenarioRecord) -> np.ndarray:
    """int64 [E]: the SDC and the tracks to predict, sorted (the official evaluation set)."""
    ids = {int(record.object_id[record.sdc_index])}
    ids.update(int(record.object_id[i]) for i in record.tracks_to_predict)
    return np.array(sorted(ids), dtype=np.int64)


def _polylines(record: ScenarioRecord, keep: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
    index = np.flatnonzero(keep)
    return [record.map_polyline(m) for m in index], [int(record.map_id[m]) for m in index]


def _fence(point: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float]:
    """The 'fence' of a stop point on one lane: the lane segment nearest the point under the
    official lane search (tail to the padding origin included), as (start, end - start, the
    point's projection parameter along it; 0 on a degenerate segment, as divide_no_nan)."""
    nearest = int(search_distance(point, start, end, 0.0, True).argmin())
    a, b = start[nearest, :2], end[nearest, :2]
    direction = b - a
    length2 = direction[0] * direction[0] + direction[1] * direction[1]
    to_point = point[:2] - a
    dot = to_point[0] * direction[0] + to_point[1] * direction[1]
    return a.numpy(), direction.numpy(), float(dot / length2) if float(length2) != 0 else 0.0


def _traffic_lights(record: ScenarioRecord, lanes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per signal lane: whether it is a known lane, its STOP steps, and its stop-point 'fence' at
    each of the steps 10..90 (arrays [L, T + 1, ...]).

    As in the official `_tensorize_traffic_signals`, a lane whose signal is absent at a step has
    the stop point (0, 0) at that step, so its fence there is the one of the world origin. That
    fence decides whether an object is 'behind' the stop point at the step before a crossing:
    a signal that reappears in a STOP state can count as crossed by any object already past the
    stop point, whatever it does (for lanes heading towards the origin).
    """
    t0 = record.current_time_index
    num, steps = len(record.tl_lane_id), record.num_steps - t0
    present = record.tl_state[t0:] != TL_ABSENT  # [T + 1, L]
    out = dict(lane_id=record.tl_lane_id.astype(np.int64), known=np.zeros(num, bool),
               stop=np.isin(record.tl_state[t0:], STOP_STATES).T,
               fence_start=np.zeros((num, steps, 2), np.float32), fence_dir=np.zeros((num, steps, 2), np.float32),
               stop_t=np.zeros((num, steps), np.float32))
    origin = torch.zeros(3)
    for l, lane_id in enumerate(record.tl_lane_id.tolist()):
        segs = np.flatnonzero(lanes["owner"] == lane_id)
        if len(segs) == 0:
            continue
        start = torch.as_tensor(lanes["start"][segs])
        end = torch.as_tensor(lanes["end"][segs])
        stop = torch.as_tensor(record.tl_stop_point[l].astype(np.float32))
        fences = [_fence(stop, start, end), _fence(origin, start, end)]  # signal present, absent
        pick = np.where(present[:, l], 0, 1)
        out["known"][l] = True
        for key, k in (("fence_start", 0), ("fence_dir", 1), ("stop_t", 2)):
            out[key][l] = np.stack([np.asarray(f[k], np.float32) for f in fences])[pick]
    return out


def _pad(arrays: list[np.ndarray], fill=0) -> np.ndarray:
    """Stack arrays that differ in their first axis, padding with `fill`."""
    size = max([a.shape[0] for a in arrays] + [1])
    out = np.full((len(arrays), size, *arrays[0].shape[1:]), fill, dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
    return out


def build_context(records: Sequence[ScenarioRecord], device: str | torch.device = "cpu") -> MetricContext:
    """Pad the logged data of `records` into one `MetricContext` on `device`.

    Raises ValueError for a scenario the official evaluator cannot score: no road edges, or an
    evaluated agent that is not a sim agent.
    """
    per = {k: [] for k in ("agent", "eval", "eval_mask", "vehicle", "size", "pxyz", "phead", "lxyz",
                           "lhead", "lvalid", "vsteps", "edges", "lanes", "tl")}
    for record in records:
        t0 = record.current_time_index
        if t0 < PREFIX_STEPS - 1 or record.num_steps - t0 - 1 != NUM_FUTURE_STEPS:
            raise ValueError(f"scenario {record.scenario_id}: needs current step >= 1 and "
                             f"{NUM_FUTURE_STEPS} future steps")
        mask = record.sim_agent_mask
        sim_ids = record.object_id[mask]
        eval_ids = evaluated_agent_ids(record)
        position = {int(i): s for s, i in enumerate(sim_ids)}
        missing = [int(i) for i in eval_ids if int(i) not in position]
        if missing:
            raise ValueError(f"scenario {record.scenario_id}: evaluated agents {missing} are not "
                             "valid at the current step")
        edge_lines, edge_ids = _polylines(record, record.map_kind == ROAD_EDGE)
        edges = build_segments(edge_lines, edge_ids, CYCLIC_TOLERANCE_M2, tail_to_origin=False)
        if len(edges["owner"]) == 0:
            raise ValueError(f"scenario {record.scenario_id} has no road edges (the official "
                             "evaluator rejects it: 'Missing road edges')")
        lane_lines, lane_ids = _polylines(record, (record.map_kind == LANE)
                                          & (record.map_subtype == LANE_TYPE_SURFACE_STREET))
        lanes = build_segments(lane_lines, lane_ids, None, tail_to_origin=True)
        xyz = record.xyz[mask].astype(np.float32)
        heading = record.heading[mask].astype(np.float32)
        eval_index = np.array([position[int(i)] for i in eval_ids], np.int64)
        per["agent"].append(np.ones(len(sim_ids), bool))
        per["eval"].append(eval_index)
        per["eval_mask"].append(np.ones(len(eval_index), bool))
        per["vehicle"].append(record.object_type[mask] == 1)
        per["size"].append(record.size[mask, t0].astype(np.float32))
        per["pxyz"].append(xyz[:, t0 - 1 : t0 + 1])
        per["phead"].append(heading[:, t0 - 1 : t0 + 1])
        per["lxyz"].append(xyz[:, t0 + 1 :])
        per["lhead"].append(heading[:, t0 + 1 :])
        per["lvalid"].append(record.valid[mask, t0 + 1 :])
        per["vsteps"].append(record.valid[mask][eval_index].sum(1).astype(np.float32))
        per["edges"].append(edges)
        per["lanes"].append(lanes)
        per["tl"].append(_traffic_lights(record, lanes))

    t = lambda x: torch.as_tensor(x, device=device)
    tl = per["tl"]
    return MetricContext(
        scenario_ids=tuple(r.scenario_id for r in records),
        agent_mask=t(_pad(per["agent"], False)),
        eval_index=t(_pad(per["eval"], 0)),
        eval_mask=t(_pad(per["eval_mask"], False)),
        is_vehicle=t(_pad(per["vehicle"], False)),
        size=t(_pad(per["size"], 1.0)),
        prefix_xyz=t(_pad(per["pxyz"])),
        prefix_heading=t(_pad(per["phead"])),
        log_xyz=t(_pad(per["lxyz"])),
        log_heading=t(_pad(per["lhead"])),
        log_valid=t(_pad(per["lvalid"], False)),
        valid_steps=t(_pad(per["vsteps"], 1.0)),
        road_edges=stack_segments(per["edges"], ROAD_EDGE_Z_STRETCH, False, device),
        lanes=stack_segments(per["lanes"], 0.0, True, device),
        tl_lane_id=t(_pad([x["lane_id"] for x in tl], -1)),
        tl_lane_known=t(_pad([x["known"] for x in tl], False)),
        # padded along lanes ([L, T + 1, ...] per scenario), then steps first
        tl_stop=t(np.moveaxis(_pad([x["stop"] for x in tl], False), 2, 1)),
        tl_fence_start=t(np.moveaxis(_pad([x["fence_start"] for x in tl]), 2, 1)),
        tl_fence_dir=t(np.moveaxis(_pad([x["fence_dir"] for x in tl]), 2, 1)),
        tl_stop_t=t(np.moveaxis(_pad([x["stop_t"] for x in tl]), 2, 1)),
    )
