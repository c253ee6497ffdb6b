"""Interaction features: signed distance to the nearest object (collisions) and time to collision.

Shapes: B scenarios, R rollouts, S agents, E ego agents (a subset of S given by `ego_index`),
T steps. Pairwise tensors are laid out [B, R, E, S, T].

Distance to nearest object follows `interaction_features.compute_distance_to_nearest_object`:
boxes are rounded rectangles (the core rectangle shrunk by `min(length, width) * 0.7 / 2` on every
side, then inflated back isotropically), the signed distance between two cores is the signed
distance from the origin to their Minkowski difference, and invalid or self pairs count as 1e10.
The official code builds the Minkowski octagon in world coordinates; here the same geometry is
computed in the ego box's frame (see `_box_core_signed_distance`), with less float32 cancellation.

Time to collision follows `compute_time_to_collision_with_object_in_front` exactly (no angle
wrapping of the yaw difference, the 75/10 degree alignment rules, 5 s cap).
"""

from __future__ import annotations

import math

import torch

from smart_r1.metrics.compiled import hot_kernel

EXTREMELY_LARGE_DISTANCE = 1e10
CORNER_ROUNDING_FACTOR = 0.7
MAX_HEADING_DIFF = math.radians(75.0)
MAX_HEADING_DIFF_FOR_SMALL_OVERLAP = math.radians(10.0)
SMALL_OVERLAP_THRESHOLD = 0.5
MAXIMUM_TIME_TO_COLLISION = 5.0


def gather_agents(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, R, S, ...] -> [B, R, E, ...] at agent indices `index` [B, E]."""
    b, r = x.shape[:2]
    idx = index[:, None].expand(b, r, -1)
    idx = idx.reshape(*idx.shape, *([1] * (x.dim() - 3))).expand(b, r, -1, *x.shape[3:])
    return torch.gather(x, 2, idx)


def _outside_rectangle(px: torch.Tensor, py: torch.Tensor, half_x, half_y) -> torch.Tensor:
    """Distance from points to an axis-aligned rectangle [-half_x, half_x] x [-half_y, half_y]
    centred at the origin (0 inside)."""
    gx = (px.abs() - half_x).clamp_min(0)
    gy = (py.abs() - half_y).clamp_min(0)
    return torch.sqrt(gx * gx + gy * gy)


@hot_kernel
def _box_core_signed_distance(cx, cy, a1, a2, b1, b2, cos_phi, sin_phi) -> torch.Tensor:
    """Signed distance between an axis-aligned core box at the origin (half extents a1, a2) and a
    core box centred at (cx, cy), half extents b1, b2, rotated by phi. Negative when overlapping.

    Overlap depth: the smallest slack over the four face normals of both boxes (separating-axis
    theorem; the Minkowski difference is convex, so this is the distance from the origin to its
    boundary). Gap between disjoint boxes: the closest pair of points always includes a corner
    of one box, so it is the smallest distance from a corner of either box to the other box.
    """
    abs_c, abs_s = cos_phi.abs(), sin_phi.abs()
    c_u = cx * cos_phi + cy * sin_phi  # B's centre along B's own axes u, v
    c_v = -cx * sin_phi + cy * cos_phi
    slack = torch.stack([
        a1 + b1 * abs_c + b2 * abs_s - cx.abs(),
        a2 + b1 * abs_s + b2 * abs_c - cy.abs(),
        a1 * abs_c + a2 * abs_s + b1 - c_u.abs(),
        a1 * abs_s + a2 * abs_c + b2 - c_v.abs(),
    ]).amin(0)
    gaps = []
    for su, sv in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        # Corner of B in A's frame, and corner of A in B's frame (B's centre at the origin).
        bx = cx + su * b1 * cos_phi - sv * b2 * sin_phi
        by = cy + su * b1 * sin_phi + sv * b2 * cos_phi
        gaps.append(_outside_rectangle(bx, by, a1, a2))
        ax, ay = su * a1 - cx, sv * a2 - cy
        gaps.append(_outside_rectangle(ax * cos_phi + ay * sin_phi, -ax * sin_phi + ay * cos_phi, b1, b2))
    gap = torch.stack(gaps).amin(0)
    return torch.where(slack >= 0, -slack, gap)


def distance_to_nearest_object(xy: torch.Tensor, heading: torch.Tensor, length: torch.Tensor,
                               width: torch.Tensor, valid: torch.Tensor, ego_index: torch.Tensor
                               ) -> torch.Tensor:
    """float [B, R, E, T]: signed distance from each ego box to the nearest other valid box.

    xy [B, R, S, T, 2], heading [B, R, S, T], length / width [B, S], valid [B, R, S, T] (R may be
    1 and broadcast), ego_index [B, E].

    Exact, but computed only for pairs that can be the nearest: the distance between two boxes
    is at most the distance between their centres (which lie inside them) and at least that minus
    both circumradii, so a pair whose lower bound exceeds the smallest centre distance is skipped.
    """
    shrink = torch.minimum(length, width) * CORNER_ROUNDING_FACTOR / 2  # [B, S]
    half_l = (length - 2 * shrink) / 2
    half_w = (width - 2 * shrink) / 2
    radius = torch.sqrt(length * length + width * width) / 2
    ego_xy = gather_agents(xy, ego_index)  # [B, R, E, T, 2]
    ego_h = gather_agents(heading, ego_index)
    ego_valid = gather_agents(valid, ego_index)
    take = lambda v: torch.gather(v, 1, ego_index)  # [B, S] -> [B, E]
    # Pair layout [B, R, E, S, T].
    dx = xy[:, :, None, ..., 0] - ego_xy[:, :, :, None, :, 0]
    dy = xy[:, :, None, ..., 1] - ego_xy[:, :, :, None, :, 1]
    s_idx = torch.arange(xy.shape[2], device=xy.device)
    is_self = (s_idx[None, None, :] == ego_index[:, None, :, None])[..., None]  # [B, 1, E, S, 1]
    usable = (ego_valid[:, :, :, None] & valid[:, :, None] & ~is_self).expand(dx.shape)
    centre = torch.where(usable, torch.sqrt(dx * dx + dy * dy), torch.full_like(dx, float("inf")))
    upper = centre.amin(dim=3, keepdim=True)
    lower = centre - take(radius)[:, None, :, None, None] - radius[:, None, None, :, None]
    b, r, e, s, t = dx.shape
    bi, ri, ei, si, ti = torch.nonzero(usable & (lower <= upper), as_tuple=True)

    # Exact signed distance of the kept pairs, in the ego box's frame.
    h_ego, h_other = ego_h[bi, ri, ei, ti], heading[bi, ri, si, ti]
    px, py = dx[bi, ri, ei, si, ti], dy[bi, ri, ei, si, ti]
    cos_e, sin_e = torch.cos(h_ego), torch.sin(h_ego)
    phi = h_other - h_ego
    ego_s = ego_index[bi, ei]
    dist = _box_core_signed_distance(px * cos_e + py * sin_e, -px * sin_e + py * cos_e,
                                     half_l[bi, ego_s], half_w[bi, ego_s], half_l[bi, si], half_w[bi, si],
                                     torch.cos(phi), torch.sin(phi))
    dist = dist - shrink[bi, ego_s] - shrink[bi, si]
    out = torch.full((b * r * e * t,), EXTREMELY_LARGE_DISTANCE, dtype=dx.dtype, device=dx.device)
    out.scatter_reduce_(0, ((bi * r + ri) * e + ei) * t + ti, dist, reduce="amin")
    return out.reshape(b, r, e, t)


@hot_kernel
def time_to_collision(xy: torch.Tensor, heading: torch.Tensor, speed: torch.Tensor,
                      length: torch.Tensor, width: torch.Tensor, valid: torch.Tensor,
                      ego_index: torch.Tensor) -> torch.Tensor:
    """float [B, R, E, T]: seconds until each ego box reaches the box it follows, capped at 5.

    speed [B, R, S, T] is the 2D speed (NaN where undefined gives the cap); other shapes as in
    `distance_to_nearest_object`.
    """
    ego_xy = gather_agents(xy, ego_index)
    ego_h = gather_agents(heading, ego_index)[:, :, :, None]  # [B, R, E, 1, T]
    ego_speed = gather_agents(speed, ego_index)
    take = lambda v: torch.gather(v, 1, ego_index)[:, None, :, None, None]  # -> [B, 1, E, 1, 1]
    other = lambda v: v[:, None, None, :, None]  # [B, S] -> [B, 1, 1, S, 1]
    yaw_diff = (heading[:, :, None] - ego_h).abs()
    cos_d, sin_d = torch.cos(yaw_diff).abs(), torch.sin(yaw_diff).abs()
    other_long = other(length) / 2 * cos_d + other(width) / 2 * sin_d
    other_lat = other(length) / 2 * sin_d + other(width) / 2 * cos_d
    dx = xy[:, :, None, ..., 0] - ego_xy[:, :, :, None, :, 0]
    dy = xy[:, :, None, ..., 1] - ego_xy[:, :, :, None, :, 1]
    cos_e, sin_e = torch.cos(-ego_h), torch.sin(-ego_h)
    rel_x = cos_e * dx - sin_e * dy
    rel_y = sin_e * dx + cos_e * dy
    long_distance = rel_x - take(length) / 2 - other_long
    lat_overlap = rel_y.abs() - take(width) / 2 - other_lat
    following = ((long_distance > 0) & (yaw_diff <= MAX_HEADING_DIFF) & (lat_overlap < 0)
                 & ((lat_overlap < -SMALL_OVERLAP_THRESHOLD) | (yaw_diff <= MAX_HEADING_DIFF_FOR_SMALL_OVERLAP)))
    usable = following & valid[:, :, None]
    masked = long_distance + (~usable).to(long_distance.dtype) * EXTREMELY_LARGE_DISTANCE
    ahead_distance, ahead = masked.min(dim=3)  # [B, R, E, T]
    speed_all = speed[:, :, None].expand(-1, -1, ahead.shape[2], -1, -1)
    ahead_speed = torch.gather(speed_all, 3, ahead[:, :, :, None]).squeeze(3)
    rel_speed = ego_speed - ahead_speed
    ttc = torch.minimum(ahead_distance / rel_speed, torch.full_like(rel_speed, MAXIMUM_TIME_TO_COLLISION))
    return torch.where(rel_speed > 0, ttc, torch.full_like(ttc, MAXIMUM_TIME_TO_COLLISION))
