"""The motion vocabulary: 0.5 s motion contours per agent type, clustered from data with K-disks.

A token is the agent's 5 poses (x, y, heading) over the next 0.5 s at 10 Hz, in the frame of its
pose at the start of the interval. Tokens are chosen per type (vehicle, pedestrian, cyclist) by
K-disk clustering: visit the samples in random order, keep one as a centre and drop every sample
within `eps` of it (root-mean-square corner distance of a nominal box over the 5 poses); `eps` is the largest
value (binary search) that still yields `size` centres, so the centres cover the data evenly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from smart_r1.storage import save_torch
from smart_r1.tokens.geometry import box_corners, relative, wrap_angle
from smart_r1.types import CYCLIST, PEDESTRIAN, ScenarioRecord

SHIFT = 5  # steps per token (0.5 s at 10 Hz)
NUM_ANCHORS = 19  # poses at steps 0, 5, ..., 90
NUM_TOKENS = NUM_ANCHORS - 1  # 18 intervals per WOMD scenario
NUM_HISTORY_TOKENS = 2  # intervals 0-5 and 5-10
NUM_FUTURE_TOKENS = NUM_TOKENS - NUM_HISTORY_TOKENS  # 16 tokens = 80 steps
NUM_TYPES = 3  # vehicle (also "other"/unset), pedestrian, cyclist
TYPE_NAMES = ("vehicle", "pedestrian", "cyclist")
# Nominal box (length, width) of each type, used by the clustering and tokenising distances.
NOMINAL_SIZE = np.array([[4.8, 2.0], [1.0, 1.0], [2.0, 1.0]], dtype=np.float32)
# Ranges of the synthetic unicycle samples added where a type has too little data:
# (max speed m/s, max |acceleration| m/s^2, max |yaw rate| rad/s).
_SYNTHETIC_RANGES = ((25.0, 4.0, 0.8), (2.5, 1.5, 1.5), (10.0, 2.5, 1.0))


def type_index(object_type):
    """WOMD object types -> vocabulary type index 0..2 (anything not pedestrian/cyclist is a vehicle)."""
    if isinstance(object_type, torch.Tensor):
        out = torch.zeros(object_type.shape, dtype=torch.long, device=object_type.device)
    else:
        out = np.zeros(np.shape(object_type), np.int64)
    out[object_type == PEDESTRIAN] = 1
    out[object_type == CYCLIST] = 2
    return out


@dataclass(frozen=True)
class MotionVocab:
    """contours: float32 [NUM_TYPES, V, SHIFT, 3], poses after 1..5 steps in the start pose's frame."""

    contours: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.contours.shape[1])

    @property
    def end_poses(self) -> torch.Tensor:
        """float32 [NUM_TYPES, V, 3]: the pose reached after the whole token."""
        return self.contours[:, :, -1]

    def validate(self) -> "MotionVocab":
        c = self.contours
        if c.ndim != 4 or c.shape[0] != NUM_TYPES or c.shape[2:] != (SHIFT, 3):
            raise ValueError(f"motion vocabulary has shape {tuple(c.shape)}, expected [{NUM_TYPES}, V, {SHIFT}, 3]")
        if not torch.isfinite(c).all():
            raise ValueError("motion vocabulary holds non-finite values")
        return self

    def to(self, device) -> "MotionVocab":
        return MotionVocab(self.contours.to(device))

    def to_dict(self) -> dict:
        return {"contours": self.contours.cpu(), "shift": SHIFT, "types": list(TYPE_NAMES)}

    @classmethod
    def from_dict(cls, d: dict) -> "MotionVocab":
        if int(d.get("shift", SHIFT)) != SHIFT:
            raise ValueError(f"vocabulary was built for {d['shift']}-step tokens, this code uses {SHIFT}")
        return cls(d["contours"].float()).validate()

    def save(self, path) -> None:
        save_torch(self.to_dict(), path)

    @classmethod
    def load(cls, path) -> "MotionVocab":
        return cls.from_dict(torch.load(path, map_location="cpu", weights_only=True))


def motion_samples(record: ScenarioRecord) -> list[np.ndarray]:
    """Logged 0.5 s contours of every agent and interval whose 6 poses are all valid.

    Returns one float32 array [n_type, SHIFT, 3] per type, in the start pose's frame."""
    pose = np.concatenate([record.xyz[..., :2], record.heading[..., None]], -1)  # [A, 91, 3]
    t0 = np.arange(NUM_TOKENS) * SHIFT  # [18] interval starts
    steps = t0[:, None] + np.arange(SHIFT + 1)  # [18, 6]
    windows = pose[:, steps]  # [A, 18, 6, 3]
    ok = record.valid[:, steps].all(-1)  # [A, 18]
    local = relative(windows[:, :, :1], windows[:, :, 1:])  # [A, 18, 5, 3]
    types = np.broadcast_to(type_index(record.object_type)[:, None], ok.shape)  # [A, 18]
    return [local[ok & (types == k)].astype(np.float32) for k in range(NUM_TYPES)]


def synthetic_samples(type_id: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [n, SHIFT, 3]: unicycle contours with random speed, acceleration and yaw rate."""
    v_max, a_max, w_max = _SYNTHETIC_RANGES[type_id]
    v0 = rng.uniform(0, v_max, n)
    acc = rng.uniform(-a_max, a_max, n)
    yaw_rate = rng.uniform(-w_max, w_max, n) * np.clip(v0 / 3.0, 0.2, 1.0)
    dt = 0.1
    out = np.zeros((n, SHIFT, 3), np.float32)
    x = y = h = np.zeros(n)
    v = v0
    for i in range(SHIFT):  # 5 steps of a unicycle model, vectorised over samples
        v = np.maximum(v + acc * dt, 0.0)
        h = h + yaw_rate * dt
        x, y = x + v * np.cos(h) * dt, y + v * np.sin(h) * dt
        out[:, i] = np.stack([x, y, wrap_angle(h)], -1)
    return out


def _contour_points(samples: np.ndarray, type_id: int) -> np.ndarray:
    """[N, SHIFT, 3] -> float32 [N, SHIFT * 4, 2] corner points of the nominal box along the contour."""
    length, width = (float(v) for v in NOMINAL_SIZE[type_id])
    return box_corners(samples, length, width).reshape(samples.shape[0], SHIFT * 4, 2).astype(np.float32)


def _pairwise_distance(points: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """float16 [N, N] root-mean-square distance between the corner points of every pair of samples."""
    flat = points.reshape(points.shape[0], -1).astype(np.float32)  # [N, 40]
    sq = (flat ** 2).sum(1)  # [N]
    out = np.empty((flat.shape[0], flat.shape[0]), np.float16)
    for i in range(0, flat.shape[0], chunk):  # row blocks bound the float32 temporary
        d2 = sq[i:i + chunk, None] + sq[None] - 2 * flat[i:i + chunk] @ flat.T  # [chunk, N]
        out[i:i + chunk] = np.sqrt(np.maximum(d2, 0) / points.shape[1])
    return out


def _kdisk_pass(dist: np.ndarray, order: np.ndarray, eps: float, k: int) -> list[int]:
    """Greedy K-disk cover in the given visiting order; stops after k centres."""
    uncovered = np.ones(dist.shape[0], dtype=bool)
    chosen = []
    for i in order:
        if uncovered[i]:
            chosen.append(int(i))
            if len(chosen) == k:
                break
            uncovered &= dist[i] > eps
    return chosen


def kdisk_cluster(samples: np.ndarray, k: int, type_id: int, seed: int = 0, iters: int = 10) -> np.ndarray:
    """K-disk centres [k, SHIFT, 3] of samples [N, SHIFT, 3] (N >= k expected; see build_vocab).

    The distance is the root-mean-square distance between the nominal box's corners along the two
    contours; memory is N^2 half floats (200 MB at N = 10000)."""
    x = np.asarray(samples, np.float32)
    dist = _pairwise_distance(_contour_points(x, type_id))  # [N, N]
    order = np.random.default_rng(seed).permutation(x.shape[0])
    lo, hi = 0.0, float(dist.max()) if x.shape[0] else 0.0
    best = _kdisk_pass(dist, order, lo, k)
    for _ in range(iters):  # largest eps that still gives k centres
        mid = (lo + hi) / 2
        chosen = _kdisk_pass(dist, order, mid, k)
        if len(chosen) >= k:
            lo, best = mid, chosen
        else:
            hi = mid
    centres = x[best]
    if len(best) < k:  # fewer distinct samples than tokens: fill with jittered copies
        rng = np.random.default_rng(seed + 1)
        extra = centres[rng.integers(len(best), size=k - len(best))]
        centres = np.concatenate([centres, extra + rng.normal(0, 0.01, extra.shape).astype(np.float32)])
    return centres


def build_vocab(records: Iterable[ScenarioRecord], size: int = 2048, seed: int = 0,
                max_samples: int = 10000, min_samples_factor: int = 4, iters: int = 10) -> MotionVocab:
    """Cluster the logged contours of `records` into `size` tokens per type.

    Each type uses at most `max_samples` random data samples; a type with fewer than
    `min_samples_factor * size` samples is topped up with synthetic unicycle contours."""
    rng = np.random.default_rng(seed)
    per_type: list[list[np.ndarray]] = [[] for _ in range(NUM_TYPES)]
    for record in records:
        for k, s in enumerate(motion_samples(record)):
            per_type[k].append(s)
    contours = []
    for k in range(NUM_TYPES):
        data = np.concatenate(per_type[k]) if per_type[k] else np.zeros((0, SHIFT, 3), np.float32)
        if len(data) > max_samples:
            data = data[rng.choice(len(data), max_samples, replace=False)]
        short = min_samples_factor * size - len(data)
        if short > 0:
            data = np.concatenate([data, synthetic_samples(k, short, rng)])
        contours.append(kdisk_cluster(data, size, k, seed=seed + k, iters=iters))
    return MotionVocab(torch.as_tensor(np.stack(contours))).validate()  # [3, V, 5, 3]
