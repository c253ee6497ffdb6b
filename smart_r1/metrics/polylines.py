"""Map polylines as flat, batched segment sets, and an exact nearest-segment search.

The official evaluator compares every query point with every segment of the map (a dense
[points, polylines, max_segments] tensor). That is tens of millions of pairs per scenario. Here
segments are grouped in chunks of `CHUNK` consecutive segments with an axis-aligned bounding box.
A group of nearby query points (e.g. the corners of one box over 8 steps) keeps its
`GROUP_CHUNKS` nearest boxes; each point of it is compared exactly with the segments of its
`TOP_CHUNKS` nearest among those; the answer is accepted only when it is provably the global
minimum (closer than the lower bound of every box left out). The few points that fail the proof
are searched exhaustively, so the result is the segment the dense search picks, ties included
(lowest flat index first).

Shapes: B scenarios, M segments (padded), C = M / CHUNK chunks, N query points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from smart_r1.metrics.compiled import hot_kernel

CHUNK = 8
TOP_CHUNKS = 6
GROUP_CHUNKS = 24
_MAX_POINTS = 1 << 16  # query points per block (memory: ~100 candidates per point)
_FALLBACK_BATCH = 256  # query points per exhaustive-search block (bounds memory)


@dataclass(frozen=True)
class SegmentSet:
    """Segments of many polylines, flattened polyline-major (the official flat order).

    Fields (B scenarios, M segments, C chunks):
        start, end: float32 [B, M, 3], segment end points
        valid: bool [B, M], False for padding
        prev, next: int64 [B, M], index of the neighbouring segment used for the sign at the start
            and end of this one (itself at the open end of a polyline)
        has_prev, has_next: bool [B, M], whether that neighbour counts (the official validity)
        convex_start, convex_end: bool [B, M], local convexity at the segment's start and end
        owner: int64 [B, M], id of the map feature the segment belongs to
        box_lo, box_hi: float32 [B, C, 3], per-chunk bounds of the search geometry, z stretched
        dense_index: int64 [B, D], segments compared with every point instead of through boxes
            (the lane tails below, whose boxes would be huge), padded with an invalid index
        dense_valid: bool [B, D]
        comp: float32 [B, 7, M], per segment: start x, y, z, end - start x, y, z, and the squared
            2D length (rows contiguous, so that gathered candidates are too)
        z_stretch: weight of z in the search distance (3 for road edges, 0 for lanes)
        reflected: the search metric is |p - a + t (b - a)| (the official lane search) rather
            than the distance to the segment; boxes then bound the reflected segment [a, 2a - b]
    """

    start: torch.Tensor
    end: torch.Tensor
    valid: torch.Tensor
    prev: torch.Tensor
    next: torch.Tensor
    has_prev: torch.Tensor
    has_next: torch.Tensor
    convex_start: torch.Tensor
    convex_end: torch.Tensor
    owner: torch.Tensor
    box_lo: torch.Tensor
    box_hi: torch.Tensor
    dense_index: torch.Tensor
    dense_valid: torch.Tensor
    comp: torch.Tensor
    z_stretch: float
    reflected: bool

    def to(self, device) -> "SegmentSet":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return SegmentSet(**moved)


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def build_segments(polylines: list[np.ndarray], owners: list[int],
                   cyclic_tolerance_m2: float | None, tail_to_origin: bool) -> dict[str, np.ndarray]:
    """One scenario's polylines -> numpy arrays of a `SegmentSet` (no batch axis).

    `polylines` are float [n_i, 3]; those with fewer than 2 points are dropped, as officially.
    `cyclic_tolerance_m2`: a polyline whose first and last points are closer than this (squared)
    wraps around for the sign rule. As in the official padded tensors, the wrap only takes effect
    for polylines as long as the longest one; shorter ones see a padding segment there.
    """
    kept = [(np.asarray(p, np.float32), o) for p, o in zip(polylines, owners) if len(p) >= 2]
    longest = max((len(p) for p, _ in kept), default=0)
    parts = {k: [] for k in ("start", "end", "prev", "next", "has_prev", "has_next", "owner", "dense")}
    offset = 0
    for points, owner in kept:
        n = len(points) - 1  # segments
        idx = np.arange(n) + offset
        cyclic = (cyclic_tolerance_m2 is not None
                  and float(np.sum(np.square(points[0] - points[-1]))) < cyclic_tolerance_m2)
        wraps = cyclic and len(points) == longest
        prev, nxt = idx - 1, idx + 1
        prev[0] = idx[-1] if wraps else idx[0]
        nxt[-1] = idx[0] if wraps else idx[-1]
        has_prev = np.ones(n, bool)
        has_next = np.ones(n, bool)
        # A shorter cyclic polyline meets the zero padding: the official rule then ignores the
        # neighbour at both ends; a non-cyclic one pads with the segment itself (same result).
        if cyclic and not wraps:
            has_prev[0] = False
            has_next[-1] = False
        start, end, dense = points[:-1], points[1:], np.zeros(n, bool)
        if tail_to_origin and len(points) < longest:
            start = np.concatenate([start, points[-1:]])
            end = np.concatenate([end, np.zeros((1, 3), np.float32)])
            dense = np.append(dense, True)
            # Lanes never use the sign rule; neighbours of the tail are itself.
            prev, nxt = np.append(prev, offset + n), np.append(nxt, offset + n)
            has_prev, has_next = np.append(has_prev, False), np.append(has_next, False)
            n += 1
        parts["start"].append(start)
        parts["end"].append(end)
        parts["prev"].append(prev)
        parts["next"].append(nxt)
        parts["has_prev"].append(has_prev)
        parts["has_next"].append(has_next)
        parts["owner"].append(np.full(n, owner, np.int64))
        parts["dense"].append(dense)
        offset += n
    if not kept:
        empty = np.zeros((0, 3), np.float32)
        return dict(start=empty, end=empty, prev=np.zeros(0, np.int64), next=np.zeros(0, np.int64),
                    has_prev=np.zeros(0, bool), has_next=np.zeros(0, bool), owner=np.zeros(0, np.int64),
                    convex_start=np.zeros(0, bool), convex_end=np.zeros(0, bool), dense=np.zeros(0, bool))
    out = {k: np.concatenate(v) for k, v in parts.items()}
    direction = (out["end"] - out["start"])[:, :2]
    out["convex_start"] = _cross(direction[out["prev"]], direction) > 0
    out["convex_end"] = _cross(direction, direction[out["next"]]) > 0
    return out


def stack_segments(per_scenario: list[dict[str, np.ndarray]], z_stretch: float, reflected: bool,
                   device) -> SegmentSet:
    """Pad one-scenario arrays from `build_segments` to a batched `SegmentSet`."""
    sizes = [len(s["owner"]) for s in per_scenario]
    m = max(1, -(-max(sizes) // CHUNK)) * CHUNK
    b = len(per_scenario)
    start = np.zeros((b, m, 3), np.float32)
    end = np.zeros((b, m, 3), np.float32)
    valid = np.zeros((b, m), bool)
    ints = {k: np.zeros((b, m), np.int64) for k in ("prev", "next", "owner")}
    bools = {k: np.zeros((b, m), bool) for k in ("has_prev", "has_next", "convex_start", "convex_end")}
    for i, (s, n) in enumerate(zip(per_scenario, sizes)):
        start[i, :n], end[i, :n], valid[i, :n] = s["start"], s["end"], True
        for k in ints:
            ints[k][i, :n] = s[k]
        for k in bools:
            bools[k][i, :n] = s[k]
    # Bounding boxes of the geometry the search metric measures against, z scaled by the stretch.
    other = 2 * start - end if reflected else end
    scale = np.array([1.0, 1.0, z_stretch], np.float32)
    lo = (np.minimum(start, other) * scale).reshape(b, m // CHUNK, CHUNK, 3)
    hi = (np.maximum(start, other) * scale).reshape(b, m // CHUNK, CHUNK, 3)
    dense = np.zeros((b, m), bool)
    for i, (s, n) in enumerate(zip(per_scenario, sizes)):
        dense[i, :n] = s["dense"]
    d = max(1, int(dense.sum(1).max()))
    dense_index = np.full((b, d), m - 1, np.int64)
    dense_valid = np.zeros((b, d), bool)
    for i in range(b):
        where = np.flatnonzero(dense[i])
        dense_index[i, :len(where)], dense_valid[i, :len(where)] = where, True
    pad = ~(valid & ~dense).reshape(b, m // CHUNK, CHUNK, 1)
    box_lo = np.where(pad, np.inf, lo).min(axis=2)
    box_hi = np.where(pad, -np.inf, hi).max(axis=2)
    t = lambda x: torch.as_tensor(x, device=device)
    delta = end - start
    comp = np.concatenate([np.moveaxis(start, 2, 1), np.moveaxis(delta, 2, 1),
                           (delta[..., 0] * delta[..., 0] + delta[..., 1] * delta[..., 1])[:, None]], axis=1)
    return SegmentSet(comp=t(np.ascontiguousarray(comp)), start=t(start), end=t(end), valid=t(valid), **{k: t(v) for k, v in ints.items()},
                      **{k: t(v) for k, v in bools.items()}, box_lo=t(box_lo), box_hi=t(box_hi),
                      dense_index=t(dense_index), dense_valid=t(dense_valid),
                      z_stretch=z_stretch, reflected=reflected)


def search_distance(points: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                    z_stretch: float, reflected: bool) -> torch.Tensor:
    """The official search metric between points and segments (broadcast shapes [..., 3]).

    Operation order follows the official TensorFlow code so that float32 results, and thus the
    chosen segment among near-ties, match.
    """
    start_to_point = points - start
    start_to_end = end - start
    rel_t = segment_param(start_to_point, start_to_end).clamp(0.0, 1.0)
    if reflected:  # the official lane search adds the projection (see module docstring)
        v = start_to_point[..., :2] + start_to_end[..., :2] * rel_t[..., None]
        return torch.sqrt(v[..., 0] * v[..., 0] + v[..., 1] * v[..., 1])
    v = start_to_point - start_to_end * rel_t[..., None]
    vz = v[..., 2] * z_stretch
    return torch.sqrt(v[..., 0] * v[..., 0] + v[..., 1] * v[..., 1] + vz * vz)


def segment_param(start_to_point: torch.Tensor, start_to_end: torch.Tensor) -> torch.Tensor:
    """Projection parameter of points on segments in 2D; 0 for degenerate segments (divide_no_nan)."""
    num = start_to_point[..., 0] * start_to_end[..., 0] + start_to_point[..., 1] * start_to_end[..., 1]
    den = start_to_end[..., 0] * start_to_end[..., 0] + start_to_end[..., 1] * start_to_end[..., 1]
    return torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, 1.0, den))


def _candidate_distance(points: torch.Tensor, comp: torch.Tensor, z_stretch: float, reflected: bool
                        ) -> torch.Tensor:
    """`search_distance` from points [..., N, 3] to gathered segments comp [..., 7, N, K] -> [..., N, K].

    The same operations in the same order, on contiguous component rows (several times faster
    than strided [..., 3] tensors).
    """
    px, py, pz = (points[..., i].contiguous()[..., None] for i in range(3))
    ax, ay, az, dx, dy, dz, den = comp.unbind(-3)
    sx, sy = px - ax, py - ay
    num = sx * dx + sy * dy
    rel_t = torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, 1.0, den)).clamp_(0.0, 1.0)
    if reflected:
        vx, vy = sx + dx * rel_t, sy + dy * rel_t
        return torch.sqrt(vx * vx + vy * vy)
    vx, vy = sx - dx * rel_t, sy - dy * rel_t
    vz = ((pz - az) - dz * rel_t) * z_stretch
    return torch.sqrt(vx * vx + vy * vy + vz * vz)


@hot_kernel
def _candidate_distance_at(points: torch.Tensor, comp: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                           z_stretch: float, reflected: bool) -> torch.Tensor:
    """float [B, N, K]: search distance from points [B, N, 3] to segments index [B, N, K] of
    comp [B, 7, M] (inf where `valid` [B, M] is False). One function, so that compiled, the
    gathers fuse into the distance loop instead of materialising [B, 7, N, K]."""
    b, n, k = index.shape
    flat = index.reshape(b, 1, n * k).expand(-1, comp.shape[1], -1)
    gathered = torch.gather(comp, 2, flat).reshape(b, -1, n, k)
    ok = torch.gather(valid, 1, index.reshape(b, n * k)).reshape(b, n, k)
    dist = _candidate_distance(points, gathered, z_stretch, reflected)
    return torch.where(ok, dist, torch.full_like(dist, float("inf")))


def _gather_comp(segs: SegmentSet, index: torch.Tensor) -> torch.Tensor:
    """comp of segments index [B, N, K] -> [B, 7, N, K]."""
    b, n, k = index.shape
    flat = index.reshape(b, 1, n * k).expand(-1, segs.comp.shape[1], -1)
    return torch.gather(segs.comp, 2, flat).reshape(b, -1, n, k)


def _gap2(lo_a, hi_a, lo_b, hi_b) -> torch.Tensor:
    """Squared distance between axis-aligned intervals (broadcast), 0 where they overlap."""
    gap = (lo_b - hi_a).clamp_min(0) + (lo_a - hi_b).clamp_min(0)
    return gap * gap


@hot_kernel
def _box_bounds(lo: torch.Tensor, hi: torch.Tensor, box_lo: torch.Tensor, box_hi: torch.Tensor,
                z_stretch: float) -> torch.Tensor:
    """Squared lower bound of the search distance between query boxes lo/hi [..., 3] (already
    stretched) and chunk boxes box_lo/box_hi [..., 3], one coordinate at a time (broadcast)."""
    bound = _gap2(lo[..., 0], hi[..., 0], box_lo[..., 0], box_hi[..., 0])
    bound = bound + _gap2(lo[..., 1], hi[..., 1], box_lo[..., 1], box_hi[..., 1])
    if z_stretch != 0:
        bound = bound + _gap2(lo[..., 2], hi[..., 2], box_lo[..., 2], box_hi[..., 2])
    return bound


def _take_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [B, C, 3] at index [B, ...] -> [B, ..., 3]."""
    b = index.shape[0]
    flat = index.reshape(b, -1)
    out = torch.gather(values, 1, flat[..., None].expand(-1, -1, values.shape[-1]))
    return out.reshape(*index.shape, values.shape[-1])


def nearest_segment(points: torch.Tensor, segs: SegmentSet, top_chunks: int = TOP_CHUNKS,
                    group: int = 1) -> torch.Tensor:
    """int64 [B, N]: index of the segment nearest to each point [B, N, 3] under the search metric.

    Equal distances resolve to the lowest index, as `argmin` over the dense official tensor does.
    Two levels of pruning: each `group` of consecutive points (N divisible by it; e.g. the corners
    of a few consecutive steps of one box) keeps its `GROUP_CHUNKS` nearest chunks by box-to-box
    bound, then each point compares exactly with the segments of its `top_chunks` nearest among
    those. Points whose answer is not proven by the bounds are searched exhaustively.
    """
    b, n, _ = points.shape
    if b * n > _MAX_POINTS:  # bound the [B, N, candidates] temporaries: blocks of points
        step = max(group, (_MAX_POINTS // b) // group * group)
        return torch.cat([nearest_segment(points[:, i : i + step], segs, top_chunks, group)
                          for i in range(0, n, step)], dim=1)
    num_chunks = segs.box_lo.shape[1]
    scale = points.new_tensor([1.0, 1.0, segs.z_stretch])
    p = (points * scale).reshape(b, n // group, group, 3)
    g_lo, g_hi = p.amin(2), p.amax(2)  # [B, NG, 3]
    group_bound = _box_bounds(g_lo[:, :, None], g_hi[:, :, None], segs.box_lo[:, None], segs.box_hi[:, None],
                              segs.z_stretch)  # [B, NG, C]
    kg = min(GROUP_CHUNKS, num_chunks)
    g_bounds, g_chunks = torch.topk(group_bound, min(kg + 1, num_chunks), dim=-1, largest=False)
    beyond_group = g_bounds[..., kg] if kg < num_chunks else torch.full_like(g_bounds[..., 0], float("inf"))
    g_chunks = g_chunks[..., :kg]  # [B, NG, KG]
    # Point-level bounds to the group's chunks: [B, NG, g, KG].
    c_lo, c_hi = _take_rows(segs.box_lo, g_chunks)[:, :, None], _take_rows(segs.box_hi, g_chunks)[:, :, None]
    point_bound = _box_bounds(p[:, :, :, None], p[:, :, :, None], c_lo, c_hi, segs.z_stretch)
    k = min(top_chunks, kg)
    p_bounds, pick = torch.topk(point_bound, min(k + 1, kg), dim=-1, largest=False)
    chunks = torch.gather(g_chunks[:, :, None].expand(-1, -1, group, -1), 3, pick[..., :k])
    chunks = torch.sort(chunks.reshape(b, n, k), dim=-1).values  # ascending index keeps the tie rule
    next_bound = torch.minimum(p_bounds[..., k], beyond_group[:, :, None]) if k < kg else \
        beyond_group[:, :, None].expand(-1, -1, group)
    next_bound = next_bound.reshape(b, n)

    seg_index = (chunks[..., None] * CHUNK + torch.arange(CHUNK, device=points.device)).reshape(b, n, k * CHUNK)
    dist = _candidate_distance_at(points, segs.comp, seg_index, segs.valid, segs.z_stretch, segs.reflected)
    if segs.dense_valid.any():
        # Dense segments join the candidates; re-sort so that argmin's first hit is the lowest index.
        dense = segs.dense_index[:, None].expand(b, n, -1)
        d_dist = _candidate_distance(points, _gather_comp(segs, dense), segs.z_stretch, segs.reflected)
        d_dist = torch.where(segs.dense_valid[:, None], d_dist, torch.full_like(d_dist, float("inf")))
        seg_index, order = torch.sort(torch.cat([seg_index, dense], -1), dim=-1, stable=True)
        dist = torch.gather(torch.cat([dist, d_dist], -1), 2, order)
    best, arg = dist.min(dim=-1)
    result = torch.gather(seg_index, 2, arg[..., None])[..., 0]
    # Proven when every chunk left out is strictly farther (margin for float32 rounding).
    unproven = ~(best < torch.sqrt(next_bound) * (1 - 1e-5) - 1e-4)
    if unproven.any():
        bi, ni = torch.nonzero(unproven, as_tuple=True)
        for lo in range(0, bi.numel(), _FALLBACK_BATCH):
            sb, sn = bi[lo:lo + _FALLBACK_BATCH], ni[lo:lo + _FALLBACK_BATCH]
            d = _candidate_distance(points[sb, sn][:, None], segs.comp[sb][:, :, None], segs.z_stretch,
                                    segs.reflected)[:, 0]
            d = torch.where(segs.valid[sb], d, torch.full_like(d, float("inf")))
            result[sb, sn] = d.argmin(dim=-1)
    return result
