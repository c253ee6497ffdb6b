"""2-D pose algebra shared by tokens, model and rollouts. A pose is (x, y, heading) in the last axis.

Every function works on numpy arrays and torch tensors alike (it only uses operators, `cos`/`sin`
through the array's own module) and broadcasts over leading axes.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _lib(a):
    return torch if isinstance(a, torch.Tensor) else np


def wrap_angle(a):
    """Angles folded into [-pi, pi)."""
    return (a + math.pi) % (2 * math.pi) - math.pi


def compose(base, local):
    """World pose of `local` expressed in the frame of `base`. base [..., 3], local [..., 3] -> [..., 3]."""
    lib = _lib(base)
    c, s = lib.cos(base[..., 2]), lib.sin(base[..., 2])
    x = base[..., 0] + c * local[..., 0] - s * local[..., 1]
    y = base[..., 1] + s * local[..., 0] + c * local[..., 1]
    h = wrap_angle(base[..., 2] + local[..., 2])
    return lib.stack([x, y, h], -1)


def relative(base, pose):
    """`pose` expressed in the frame of `base` (inverse of compose). [..., 3], [..., 3] -> [..., 3]."""
    lib = _lib(base)
    c, s = lib.cos(base[..., 2]), lib.sin(base[..., 2])
    dx, dy = pose[..., 0] - base[..., 0], pose[..., 1] - base[..., 1]
    return lib.stack([c * dx + s * dy, -s * dx + c * dy, wrap_angle(pose[..., 2] - base[..., 2])], -1)


def box_corners(pose, length, width):
    """Corners of boxes centred at pose. pose [..., 3], length/width broadcastable to [...] -> [..., 4, 2]."""
    lib = _lib(pose)
    c, s = lib.cos(pose[..., 2]), lib.sin(pose[..., 2])
    half_l, half_w = length / 2, width / 2
    corners = []
    for sl, sw in ((1, 1), (1, -1), (-1, -1), (-1, 1)):
        lx, ly = sl * half_l, sw * half_w
        corners.append(lib.stack([pose[..., 0] + c * lx - s * ly, pose[..., 1] + s * lx + c * ly], -1))
    return lib.stack(corners, -2)  # [..., 4, 2]
