"""Kinematic features: linear and angular speed and acceleration by central differences.

Follows `trajectory_features.compute_kinematic_features` of the official evaluator: 3D speed
norms, heading differences wrapped after doubling (so a two-step difference up to pi is read
correctly), NaN at the ends where a central difference is undefined.
"""

from __future__ import annotations

import math

import torch


def central_diff(x: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [..., T]: (x[t+1] - x[t-1]) / 2, NaN at the first and last step."""
    pad = torch.full_like(x[..., :1], float("nan"))
    return torch.cat([pad, (x[..., 2:] - x[..., :-2]) / 2, pad], dim=-1)


def central_and(valid: torch.Tensor) -> torch.Tensor:
    """bool [..., T] -> [..., T]: valid[t-1] and valid[t+1]; False at both ends."""
    pad = torch.zeros_like(valid[..., :1])
    return torch.cat([pad, valid[..., 2:] & valid[..., :-2], pad], dim=-1)


def wrap_angle(angle: torch.Tensor) -> torch.Tensor:
    """Angles into [-pi, pi) (floor modulo, as TensorFlow's %)."""
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


def kinematic_features(xyz: torch.Tensor, heading: torch.Tensor, seconds_per_step: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear speed, linear acceleration, angular speed, angular acceleration, each [..., T].

    xyz: float [..., T, 3]; heading: float [..., T] (radians, not necessarily wrapped).
    """
    dpos = central_diff(xyz.movedim(-1, 0))  # [3, ..., T]
    speed = torch.sqrt(dpos[0] * dpos[0] + dpos[1] * dpos[1] + dpos[2] * dpos[2]) / seconds_per_step
    accel = central_diff(speed) / seconds_per_step
    dh_step = wrap_angle(central_diff(heading) * 2) / 2
    d2h_step = wrap_angle(central_diff(dh_step) * 2) / 2
    return speed, accel, dh_step / seconds_per_step, d2h_step / (seconds_per_step ** 2)


def kinematic_validity(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validity [..., T] of speeds (both neighbours valid) and accelerations (applied twice)."""
    speed_valid = central_and(valid)
    return speed_valid, central_and(speed_valid)
