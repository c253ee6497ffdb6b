"""Per-step collision and off-road flags of one rollout, for highlighting in renders.

Used by `smart_r1.viz.render` when `smart_r1.metrics` does not provide `rollout_signals`. These
are simple geometric tests, close to but not the same as the official WOSAC features:

    collision  two sim agents' oriented boxes (length x width at the current step) overlap, by the
               separating-axis test. The official feature is a signed box-to-box distance < 0;
               it agrees for rectangles.
    off-road   a vehicle's box corner lies on the off-road (starboard) side of its nearest
               road-edge segment (3-D distance with z stretched by 3, as the official search, so
               that edges of an overpass are not picked). The official code also resolves the
               sign at polyline joints by local convexity; here the nearest segment's side
               decides, which can differ just beyond the end of a segment at a sharp corner.
               Only vehicles are tested: pedestrians on pavements are outside road edges by design.

Shapes: S sim agents, T steps (80 simulated steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from smart_r1.types import ROAD_EDGE, VEHICLE, ScenarioRecord

_Z_STRETCH = 3.0
_CANDIDATES = 16  # nearest segment start points checked exactly per query point


@dataclass(frozen=True)
class RolloutSignals:
    """Flags per sim agent and step of one rollout.

    Fields:
        collision: bool [S, T], the agent's box overlaps another sim agent's box
        offroad: bool [S, T], the agent is a vehicle with a corner beyond the road edge
    """

    collision: np.ndarray
    offroad: np.ndarray


def box_corners(x, y, heading, length, width) -> np.ndarray:
    """float [..., 4, 2]: corners of oriented boxes (front-left, rear-left, rear-right, front-right).

    All inputs broadcast to a common shape [...].
    """
    x, y, heading, length, width = np.broadcast_arrays(x, y, heading, length, width)
    c, s = np.cos(heading), np.sin(heading)
    # Unit offsets of the corners in the box frame, scaled by half length / half width.
    fx = np.array([1.0, -1.0, -1.0, 1.0]) * 0.5
    fy = np.array([1.0, 1.0, -1.0, -1.0]) * 0.5
    dx = length[..., None] * fx  # [..., 4]
    dy = width[..., None] * fy
    cx = x[..., None] + c[..., None] * dx - s[..., None] * dy
    cy = y[..., None] + s[..., None] * dx + c[..., None] * dy
    return np.stack([cx, cy], axis=-1)


def box_overlaps(corners: np.ndarray) -> np.ndarray:
    """bool [T, S, S]: pairwise overlap of S boxes at each of T steps (diagonal False).

    `corners` float [T, S, 4, 2]. Separating-axis test: two rectangles are disjoint exactly when
    the projections on one of the four edge normals (two per box) do not overlap.
    """
    edges = corners[:, :, [0, 1]] - corners[:, :, [1, 2]]  # [T, S, 2, 2]: the box's two edge directions
    axes = edges / np.maximum(np.linalg.norm(edges, axis=-1, keepdims=True), 1e-9)
    # proj[t, a, k, b, c]: corner c of box b projected on axis k of box a.
    proj = np.einsum("takd,tbcd->takbc", axes, corners)
    lo, hi = proj.min(-1), proj.max(-1)  # [T, A, 2, B]
    own = np.arange(corners.shape[1])
    own_lo = lo[:, own, :, own].transpose(1, 0, 2)[..., None]  # [T, A, 2, 1]: box a on its own axes
    own_hi = hi[:, own, :, own].transpose(1, 0, 2)[..., None]
    overlap_on_own_axes = ((lo <= own_hi) & (hi >= own_lo)).all(axis=2)  # [T, A, B]
    overlap = overlap_on_own_axes & overlap_on_own_axes.transpose(0, 2, 1)
    overlap[:, own, own] = False
    return overlap


def _road_edge_segments(record: ScenarioRecord) -> tuple[np.ndarray, np.ndarray]:
    """Start and end points float [E, 3] of every road-edge segment."""
    starts, ends = [], []
    for m in np.flatnonzero(record.map_kind == ROAD_EDGE):
        line = record.map_polyline(m)
        if len(line) >= 2:
            starts.append(line[:-1])
            ends.append(line[1:])
    if not starts:
        return np.zeros((0, 3)), np.zeros((0, 3))
    return np.concatenate(starts), np.concatenate(ends)


def offroad_corners(record: ScenarioRecord, points: np.ndarray) -> np.ndarray:
    """bool [N]: whether each point float [N, 3] is on the off-road side of its nearest road edge.

    Candidates first: the `_CANDIDATES` segments whose start points are nearest (k-d tree in the
    z-stretched space); then the exact point-to-segment distance picks one of them. WOMD road
    edges are sampled every ~0.5-1 m, so the nearest segment is among those candidates.
    """
    from scipy.spatial import cKDTree

    starts, ends = _road_edge_segments(record)
    out = np.zeros(len(points), dtype=bool)
    if len(starts) == 0 or len(points) == 0:
        return out
    stretch = np.array([1.0, 1.0, _Z_STRETCH])
    k = min(_CANDIDATES, len(starts))
    _, cand = cKDTree(starts * stretch).query(points * stretch, k=k)  # [N, k]
    cand = cand.reshape(len(points), k)
    a, seg = starts[cand], (ends - starts)[cand]  # [N, k, 3]
    to_p = points[:, None, :] - a
    t = np.clip((to_p[..., :2] * seg[..., :2]).sum(-1) / np.maximum((seg[..., :2] ** 2).sum(-1), 1e-12), 0, 1)
    dist2 = (((to_p - t[..., None] * seg) * stretch) ** 2).sum(-1)
    best = dist2.argmin(axis=1)
    rows = np.arange(len(points))
    tp, sg = to_p[rows, best], seg[rows, best]
    # Positive cross product = starboard side = off-road (road edges wind counterclockwise).
    return tp[:, 0] * sg[:, 1] - tp[:, 1] * sg[:, 0] > 0


def rollout_signals(record: ScenarioRecord, states: np.ndarray) -> RolloutSignals:
    """Collision and off-road flags of one rollout `states` float [S, 80, 4] (x, y, z, heading)."""
    mask = record.sim_agent_mask
    size = record.size[mask, record.current_time_index]  # [S, 3], held over the rollout
    corners = box_corners(states[..., 0], states[..., 1], states[..., 3],
                          size[:, None, 0], size[:, None, 1])  # [S, T, 4, 2]
    collision = box_overlaps(corners.transpose(1, 0, 2, 3)).any(axis=2).T  # [S, T]

    offroad = np.zeros(states.shape[:2], dtype=bool)
    vehicles = record.object_type[mask] == VEHICLE
    if vehicles.any():
        c = corners[vehicles]  # [V, T, 4, 2]
        z = np.broadcast_to(states[vehicles, :, None, 2], c.shape[:-1])
        points = np.concatenate([c, z[..., None]], axis=-1).reshape(-1, 3)
        offroad[vehicles] = offroad_corners(record, points).reshape(c.shape[:3]).any(axis=-1)
    return RolloutSignals(collision=collision, offroad=offroad)
