"""Map tokens: every map polyline cut into short segments of equal length, kept as continuous features.

Choice (documented per the issue): SMART discretises map segments into a map vocabulary; here a
segment keeps its continuous geometry instead: `POINTS_PER_SEGMENT` points resampled evenly along
arclength, in the segment's own frame (origin at its first point, x axis towards its last point),
plus its length, its kind and subtype, and the traffic-light state of its lane at the current
step. The model embeds these with an MLP and embeddings, so no information is lost to quantisation
and there is no second vocabulary to build and version. A feature of length L becomes
ceil(L / SEGMENT_LENGTH) segments (a stop sign, a single point, becomes one zero-length segment).
Polygons (crosswalks, speed bumps, driveways) are walked along their stored outline, not closed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from smart_r1.tokens.geometry import relative
from smart_r1.types import LANE, ScenarioRecord

SEGMENT_LENGTH = 5.0  # metres
POINTS_PER_SEGMENT = 5
SEGMENT_FEATURES = 2 * POINTS_PER_SEGMENT + 1  # local points, length
NUM_SUBTYPES = 32  # room for every WOMD lane / road-line / road-edge type value
NUM_TL_STATES = 10  # 0: no signal, 1 + TrafficSignalLaneState.State (0..8)


@dataclass(frozen=True)
class MapSegments:
    """N map segments of one scenario.

    pose: float64 [N, 3], (x, y, heading) of the segment's frame, world coordinates
    features: float32 [N, SEGMENT_FEATURES], local points (x0, y0, ..., x4, y4) then length
    kind_subtype: int64 [N], kind * NUM_SUBTYPES + subtype
    tl_state: int64 [N], 0 without a signal, else 1 + the lane's state at the current step
    """

    pose: np.ndarray
    features: np.ndarray
    kind_subtype: np.ndarray
    tl_state: np.ndarray

    def __len__(self) -> int:
        return int(self.pose.shape[0])

    def select(self, index: np.ndarray) -> "MapSegments":
        return MapSegments(self.pose[index], self.features[index], self.kind_subtype[index], self.tl_state[index])


def _current_lane_signal(record: ScenarioRecord) -> np.ndarray:
    """int64 [M]: 0 or 1 + signal state of each map feature at the current step."""
    out = np.zeros(record.map_id.shape[0], np.int64)
    if record.tl_lane_id.size == 0:
        return out
    state = record.tl_state[record.current_time_index].astype(np.int64)  # [L]
    lookup = dict(zip(record.tl_lane_id.tolist(), state.tolist()))
    for m in np.nonzero(record.map_kind == LANE)[0]:  # lanes with a signal (a dozen per scene)
        s = lookup.get(int(record.map_id[m]), -1)
        if s >= 0:
            out[m] = 1 + min(s, NUM_TL_STATES - 2)
    return out


def map_segments(record: ScenarioRecord) -> MapSegments:
    """Cut every map feature of `record` into segments (see module docstring)."""
    offsets = record.map_offsets
    num_features = offsets.shape[0] - 1
    counts = np.diff(offsets)  # [M] points per feature
    keep = np.nonzero(counts > 0)[0]
    if keep.size == 0:
        return MapSegments(np.zeros((0, 3)), np.zeros((0, SEGMENT_FEATURES), np.float32),
                           np.zeros(0, np.int64), np.zeros(0, np.int64))
    pts = record.map_points[:, :2]  # [P, 2]
    fid = np.repeat(np.arange(num_features), counts)  # [P] feature of each point
    step = np.linalg.norm(np.diff(pts, axis=0), axis=1)  # [P - 1]
    step = np.concatenate([[0.0], step])  # [P]
    step[offsets[:-1][counts > 0]] = 0.0  # no length across feature boundaries
    cum = np.cumsum(step)  # [P]
    starts = np.minimum(offsets[:-1], pts.shape[0] - 1)  # [M] (clamped for empty features)
    s = cum - cum[starts][fid]  # [P] arclength within its feature
    total = np.zeros(num_features)
    total[keep] = s[offsets[1:][keep] - 1]  # [M] feature lengths
    n_seg = np.maximum(1, np.ceil(total / SEGMENT_LENGTH).astype(np.int64))[keep]  # [M']
    seg_feature = np.repeat(keep, n_seg)  # [N]
    seg_index = np.arange(seg_feature.shape[0]) - np.repeat(np.cumsum(n_seg) - n_seg, n_seg)  # [N]
    seg_len = total[seg_feature] / np.repeat(n_seg, n_seg)  # [N]
    frac = np.linspace(0.0, 1.0, POINTS_PER_SEGMENT)  # [Q]
    s_query = (seg_index[:, None] + frac) * seg_len[:, None]  # [N, Q]
    # One monotone coordinate over all features: feature m lives in [m * span, m * span + total_m].
    span = float(total.max()) + 1.0
    g_pts = s + fid * span  # [P]
    g_query = s_query + seg_feature[:, None] * span  # [N, Q]
    xy = np.stack([np.interp(g_query, g_pts, pts[:, 0]), np.interp(g_query, g_pts, pts[:, 1])], -1)  # [N, Q, 2]
    delta = xy[:, -1] - xy[:, 0]  # [N, 2]
    heading = np.where(seg_len > 1e-6, np.arctan2(delta[:, 1], delta[:, 0]), 0.0)  # [N]
    pose = np.concatenate([xy[:, 0], heading[:, None]], -1)  # [N, 3]
    local = relative(pose[:, None, :], np.concatenate([xy, np.zeros_like(xy[..., :1])], -1))[..., :2]  # [N, Q, 2]
    features = np.concatenate([local.reshape(-1, 2 * POINTS_PER_SEGMENT), seg_len[:, None]], -1)  # [N, F]
    kind_subtype = (record.map_kind.astype(np.int64) * NUM_SUBTYPES
                    + np.clip(record.map_subtype.astype(np.int64), 0, NUM_SUBTYPES - 1))[seg_feature]  # [N]
    tl = _current_lane_signal(record)[seg_feature]  # [N]
    return MapSegments(pose, features.astype(np.float32), kind_subtype, tl)
