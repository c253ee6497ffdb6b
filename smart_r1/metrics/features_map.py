"""Map features: signed distance to the road edge (off-road) and red-light violations.

Shapes: B scenarios, R rollouts, E ego agents, T steps, L traffic-signal lanes.

Distance to road edge follows `map_metric_features.compute_distance_to_road_edge`: the four
bottom corners of each box are matched to the road-edge segment nearest in 3D with z stretched
3x (so that an overpass edge is not picked), and the 2D distance to that segment gets a sign
from which side of the edge the corner lies on (road edges run counter-clockwise, the road on
their left), with the convexity rules at segment ends. The box's value is its most off-road
corner; invalid boxes get -1e10.

Red-light violations follow `traffic_light_features.compute_red_light_violation`: an object
violates at step t when it is valid at t, its lane at t (the surface-street lane nearest its
centre under the official lane search, see polylines.py) has a signal in a STOP state at t, and
its centre went from behind the stop point at t - 1 to ahead of it at t. Behind and ahead are
measured along the stop point's 'fence' segment of each step; where the signal is absent at
t - 1 that is the fence of the world origin (the official stop point of a missing signal), see
`context._traffic_lights`. Only the validity at t counts, and the object's type never does: the
first simulated step compares with the logged current step, and a logged object that was invalid
at t - 1 is compared from its stored (meaningless) position there.
"""

from __future__ import annotations

import torch

from smart_r1.metrics.polylines import SegmentSet, segment_param, nearest_segment

EXTREMELY_LARGE_DISTANCE = 1e10
# Lanes crowd together at intersections: more chunk candidates keep fallbacks rare.
LANE_TOP_CHUNKS = 16


def box_bottom_corners(xyz: torch.Tensor, heading: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """float [..., 4, 3]: bottom corners (counter-clockwise from front-left) of upright boxes.

    xyz [..., 3], heading [...], size [..., 3] (length, width, height), broadcastable.
    """
    half_l, half_w, half_h = size[..., 0] / 2, size[..., 1] / 2, size[..., 2] / 2
    c, s = torch.cos(heading), torch.sin(heading)
    dx = torch.stack([half_l, -half_l, -half_l, half_l], -1)  # [..., 4]
    dy = torch.stack([half_w, half_w, -half_w, -half_w], -1)
    x = xyz[..., None, 0] + c[..., None] * dx - s[..., None] * dy
    y = xyz[..., None, 1] + s[..., None] * dx + c[..., None] * dy
    z = (xyz[..., 2] - half_h)[..., None].expand_as(x)
    return torch.stack([x, y, z], -1)


def _side(start_to_point: torch.Tensor, start_to_end: torch.Tensor) -> torch.Tensor:
    """sign of the 2D cross product: -1 on the left of the segment (on-road), +1 on the right."""
    return torch.sign(start_to_point[..., 0] * start_to_end[..., 1] - start_to_point[..., 1] * start_to_end[..., 0])


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [B, M, ...] at index [B, N] -> [B, N, ...]."""
    idx = index.reshape(*index.shape, *([1] * (values.dim() - 2))).expand(*index.shape, *values.shape[2:])
    return torch.gather(values, 1, idx)


def signed_distance_to_road_edge(points: torch.Tensor, edges: SegmentSet) -> torch.Tensor:
    """float [B, N]: signed 2D distance from points [B, N, 3] to the road edge (> 0 off-road).

    Points close to each other in runs of 32 make the search faster (nearest_segment's groups).
    """
    # Groups of 32 points: the 4 corners of 8 consecutive steps of one box (see the caller).
    seg = nearest_segment(points, edges, group=32 if points.shape[1] % 32 == 0 else 1)  # [B, N]

    def relative(index):
        a, b = _take(edges.start, index), _take(edges.end, index)
        return points - a, b - a

    start_to_point, start_to_end = relative(seg)
    rel_t = segment_param(start_to_point, start_to_end)
    n = _side(start_to_point, start_to_end)
    n_prior = _side(*relative(_take(edges.prev, seg)))
    n_next = _side(*relative(_take(edges.next, seg)))
    before = torch.where(_take(edges.convex_start, seg), torch.maximum(n, n_prior), torch.minimum(n, n_prior))
    after = torch.where(_take(edges.convex_end, seg), torch.maximum(n, n_next), torch.minimum(n, n_next))
    sign = torch.where((rel_t < 0) & _take(edges.has_prev, seg), before,
                       torch.where((rel_t > 1) & _take(edges.has_next, seg), after, n))
    v = start_to_point[..., :2] - start_to_end[..., :2] * rel_t.clamp(0.0, 1.0)[..., None]
    return sign * torch.sqrt(v[..., 0] * v[..., 0] + v[..., 1] * v[..., 1])


def distance_to_road_edge(xyz: torch.Tensor, heading: torch.Tensor, size: torch.Tensor,
                          valid: torch.Tensor, edges: SegmentSet) -> torch.Tensor:
    """float [B, R, E, T]: the most off-road corner's signed distance; -1e10 where invalid.

    xyz [B, R, E, T, 3], heading [B, R, E, T], size [B, E, 3], valid [B, R or 1, E, T].
    """
    corners = box_bottom_corners(xyz, heading, size[:, None, :, None])  # [B, R, E, T, 4, 3]
    b = corners.shape[0]
    dist = signed_distance_to_road_edge(corners.reshape(b, -1, 3), edges).reshape(corners.shape[:-1])
    dist = dist.amax(dim=-1)
    return torch.where(valid, dist, torch.full_like(dist, -EXTREMELY_LARGE_DISTANCE))


def red_light_violation(xy: torch.Tensor, valid: torch.Tensor, lanes: SegmentSet,
                        tl_lane_id: torch.Tensor, tl_lane_known: torch.Tensor, tl_stop: torch.Tensor,
                        fence_start: torch.Tensor, fence_dir: torch.Tensor, stop_t: torch.Tensor
                        ) -> torch.Tensor:
    """bool [B, R, E, T]: red-light violation at each step after the first.

    xy [B, R, E, T + 1, 2] centres from the current step on, valid [B, R or 1, E, T + 1],
    lanes from the context, tl_lane_id / tl_lane_known [B, L], tl_stop [B, T + 1, L],
    fence_start / fence_dir [B, T + 1, L, 2] and stop_t [B, T + 1, L] (per step) as in
    `MetricContext`.
    """
    b, r, e, t1, _ = xy.shape
    start_to_xy = xy[..., None, :] - fence_start[:, None, None]  # [B, R, E, T+1, L, 2]
    along = segment_param(start_to_xy, fence_dir[:, None, None].expand_as(start_to_xy))  # [B, R, E, T+1, L]
    stop = stop_t[:, None, None]
    # Behind the fence of step t - 1 at t - 1, ahead of the fence of step t at t.
    crossed = (along[:, :, :, :-1] < stop[:, :, :, :-1]) & (along[:, :, :, 1:] > stop[:, :, :, 1:])  # [B, R, E, T, L]
    possible = (valid[:, :, :, 1:, None] & tl_stop[:, None, None, 1:] & tl_lane_known[:, None, None, None]
                & crossed)
    candidate = possible.any(-1)  # [B, R, E, T]
    if not candidate.any():
        return candidate
    # The lane search is the costly part: run it only where a violation is possible at all.
    flat = candidate.reshape(b, -1)
    bi, ni = torch.nonzero(flat, as_tuple=True)
    slot = torch.cumsum(flat.long(), dim=1)[bi, ni] - 1  # position among the scenario's candidates
    packed = xy.new_zeros((b, int(flat.sum(1).max()), 3))
    packed[bi, slot, :2] = xy[:, :, :, 1:].reshape(b, -1, 2)[bi, ni]
    lane_of = _take(lanes.owner, nearest_segment(packed, lanes, LANE_TOP_CHUNKS))  # [B, max candidates]
    lane_id = torch.full_like(flat, -1, dtype=lane_of.dtype)
    lane_id[bi, ni] = lane_of[bi, slot]
    on_lane = lane_id.reshape(b, r, e, t1 - 1, 1) == tl_lane_id[:, None, None, None]
    return (possible & on_lane).any(-1)
