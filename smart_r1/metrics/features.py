"""All WOSAC metric features of logged or simulated trajectories, batched over scenarios.

Mirrors `metric_features.compute_metric_features` of the official evaluator: simulated agents
are valid at every simulated step, the log keeps its own validity; interactions are computed
against every sim agent but reported for the ego agents (the evaluated ones, or all of them).

Shapes: B scenarios, R rollouts (1 for the log), S sim agents, E ego agents, T = 80 steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smart_r1.metrics.context import PREFIX_STEPS, MetricContext
from smart_r1.metrics.features_interaction import distance_to_nearest_object, gather_agents, time_to_collision
from smart_r1.metrics.features_kinematic import central_diff, kinematic_features
from smart_r1.metrics.features_map import distance_to_road_edge, red_light_violation
from smart_r1.types import STEP_SECONDS


@dataclass(frozen=True)
class MetricFeatures:
    """Per-step features of the ego agents; float [B, R, E, T] unless said otherwise.

    linear_speed, linear_acceleration, angular_speed, angular_acceleration: NaN where a central
        difference runs past the last step
    distance_to_nearest_object: signed, metres (1e10 when no other valid object)
    collision_per_step: bool, distance_to_nearest_object < 0
    time_to_collision: seconds, capped at 5
    distance_to_road_edge: signed, metres, > 0 off-road (-1e10 where invalid)
    offroad_per_step: bool, distance_to_road_edge > 0
    traffic_light_violation_per_step: bool
    displacement: float [B, R, E, T], 3D distance to the logged position (0 where the log is invalid)
    """

    linear_speed: torch.Tensor
    linear_acceleration: torch.Tensor
    angular_speed: torch.Tensor
    angular_acceleration: torch.Tensor
    distance_to_nearest_object: torch.Tensor
    collision_per_step: torch.Tensor
    time_to_collision: torch.Tensor
    distance_to_road_edge: torch.Tensor
    offroad_per_step: torch.Tensor
    traffic_light_violation_per_step: torch.Tensor
    displacement: torch.Tensor


def compute_features(ctx: MetricContext, xyz: torch.Tensor, heading: torch.Tensor, valid: torch.Tensor,
                     ego_index: torch.Tensor) -> MetricFeatures:
    """Features of trajectories xyz [B, R, S, T, 3], heading [B, R, S, T] (the simulated steps).

    valid: bool [B, R or 1, S, T], which boxes exist at each step. ego_index: int64 [B, E].
    """
    b, r = xyz.shape[:2]
    prefix_xyz = ctx.prefix_xyz[:, None].expand(b, r, -1, -1, -1)
    prefix_heading = ctx.prefix_heading[:, None].expand(b, r, -1, -1)
    full_xyz = torch.cat([prefix_xyz, xyz], dim=3)  # [B, R, S, 2 + T, 3], steps 9..90
    full_heading = torch.cat([prefix_heading, heading], dim=3)

    ego_xyz = gather_agents(full_xyz, ego_index)
    ego_heading = gather_agents(full_heading, ego_index)
    speed, accel, yaw_rate, yaw_accel = (f[..., PREFIX_STEPS:] for f in kinematic_features(
        ego_xyz, ego_heading, STEP_SECONDS))

    length, width = ctx.size[..., 0], ctx.size[..., 1]
    xy = xyz[..., :2]
    distance = distance_to_nearest_object(xy, heading, length, width, valid, ego_index)
    # Time to collision uses the planar speed of every agent (the official code zeroes z).
    dxy = central_diff(full_xyz[..., :2].movedim(-1, 0))
    speed_2d = (torch.sqrt(dxy[0] * dxy[0] + dxy[1] * dxy[1]) / STEP_SECONDS)[..., PREFIX_STEPS:]
    ttc = time_to_collision(xy, heading, speed_2d, length, width, valid, ego_index)

    ego_valid = gather_agents(valid, ego_index)
    ego_size = torch.gather(ctx.size, 1, ego_index[..., None].expand(-1, -1, 3))
    road_edge = distance_to_road_edge(ego_xyz[..., PREFIX_STEPS:, :], ego_heading[..., PREFIX_STEPS:],
                                      ego_size, ego_valid, ctx.road_edges)
    # Red lights look at the step before the first simulated one (the current step, always valid).
    tl_valid = torch.cat([torch.ones_like(ego_valid[..., :1]), ego_valid], dim=-1)
    red_light = red_light_violation(ego_xyz[..., PREFIX_STEPS - 1:, :2], tl_valid, ctx.lanes,
                                    ctx.tl_lane_id, ctx.tl_lane_known, ctx.tl_stop, ctx.tl_fence_start,
                                    ctx.tl_fence_dir, ctx.tl_stop_t)

    log_xyz = gather_agents(ctx.log_xyz[:, None], ego_index)
    log_valid = gather_agents(ctx.log_valid[:, None], ego_index)
    diff = ego_xyz[..., PREFIX_STEPS:, :] - log_xyz
    displacement = torch.sqrt((diff * diff).sum(-1))
    displacement = torch.where(log_valid, displacement, torch.zeros_like(displacement))

    return MetricFeatures(
        linear_speed=speed, linear_acceleration=accel, angular_speed=yaw_rate, angular_acceleration=yaw_accel,
        distance_to_nearest_object=distance, collision_per_step=distance < 0, time_to_collision=ttc,
        distance_to_road_edge=road_edge, offroad_per_step=road_edge > 0,
        traffic_light_violation_per_step=red_light, displacement=displacement)


def log_features(ctx: MetricContext, ego_index: torch.Tensor) -> MetricFeatures:
    """Features of the logged future, R = 1, with the log's own validity."""
    return compute_features(ctx, ctx.log_xyz[:, None], ctx.log_heading[:, None], ctx.log_valid[:, None],
                            ego_index)


# Pairwise tensors hold B * R * E * S * T elements; rollouts are processed in blocks that keep
# them under this size (a few hundred MB of temporaries), whatever the batch.
MAX_PAIRS = 1 << 21


def sim_features(ctx: MetricContext, states: torch.Tensor, ego_index: torch.Tensor) -> MetricFeatures:
    """Features of simulated states [B, R, S, T, 4] (x, y, z, heading); every sim agent valid."""
    states = states.to(device=ctx.device, dtype=torch.float32)
    b, r, s, t, _ = states.shape
    valid = ctx.agent_mask[:, None, :, None].expand(b, 1, s, t)
    block = max(1, MAX_PAIRS // (b * ego_index.shape[1] * s * t))
    parts = [compute_features(ctx, states[:, i : i + block, ..., :3], states[:, i : i + block, ..., 3], valid,
                              ego_index) for i in range(0, r, block)]
    if len(parts) == 1:
        return parts[0]
    return MetricFeatures(**{k: torch.cat([vars(p)[k] for p in parts], dim=1) for k in vars(parts[0])})
