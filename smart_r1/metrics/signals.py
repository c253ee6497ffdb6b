"""Per-rollout and per-agent signals for reinforcement learning (MPO rewards).

`realism` of a rollout is the WOSAC 2025 metametric computed as if that rollout were the only
one submitted (R = 1): the log is scored against histograms built from this rollout's 80 steps
(kinematic, distance and time-to-collision features pool the steps of each object) and against
Bernoulli estimates from its single collision / off-road / red-light outcome per object, with
the official additive smoothing and weights. Why this definition:
- it is the official metric, unchanged, applied to one sample, so it rewards exactly what the
  challenge measures (matching the log's distribution of every feature), on the same [0, 1] scale
  as the fixed MPO baseline alpha;
- it depends on this rollout and the log only, so sibling rollouts do not change its reward (a
  leave-one-out contribution to the group's metametric would couple them and is of order 1/R);
- its mean over rollouts is lower than the scenario's metametric with R rollouts (one sample
  makes a coarser histogram), but it is monotone in the same direction for each feature.

`collision` and `offroad` flag each sim agent of each rollout, over all sim agents (not just the
evaluated ones), with the official per-step tests (signed box distance < 0, most off-road box
corner > 0) at the steps where the agent's log is valid, as the official indication does. So
`collision[:, eval].mean()` is the official `simulated_collision_rate`.

Shapes: R rollouts, S sim agents (in `record.sim_agent_ids` order), T = 80 steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from smart_r1.metrics.context import build_context
from smart_r1.metrics.features import log_features, sim_features
from smart_r1.metrics.features_interaction import gather_agents
from smart_r1.metrics.wosac import default_specs, pad_states, score
from smart_r1.types import ScenarioRecord


@dataclass(frozen=True)
class RolloutSignals:
    """RL signals of the R rollouts of one scenario (tensors on the states' device).

    collision: bool [R, S], the agent's box overlaps another box at a log-valid step
    offroad: bool [R, S], a corner of the agent's box is beyond a road edge at a log-valid step
    realism: float [R], the WOSAC metametric of each rollout alone (module docstring)
    min_distance_to_object: float [R, S], smallest signed box distance over the valid steps
    max_distance_to_road_edge: float [R, S], largest signed road-edge distance over valid steps
    likelihoods: dict name -> float [R], each `*_likelihood` of the single-rollout metric
    eval_mask: bool [S], agents in the official evaluation set (SDC and tracks to predict)
    """

    collision: torch.Tensor
    offroad: torch.Tensor
    realism: torch.Tensor
    min_distance_to_object: torch.Tensor
    max_distance_to_road_edge: torch.Tensor
    likelihoods: dict
    eval_mask: torch.Tensor


def rollout_signals(record: ScenarioRecord, states, config=None) -> RolloutSignals:
    """Signals of states [R, S, 80, 4] (numpy or tensor) of one scenario; see the module docstring."""
    device = states.device if isinstance(states, torch.Tensor) else torch.device("cpu")
    padded = pad_states([record], [states], device)  # [1, R, S, T, 4]
    specs = default_specs(config)
    with torch.no_grad():
        ctx = build_context([record], device)
        _, r, s = padded.shape[:3]
        every_agent = torch.arange(s, device=device)[None]  # [1, S]: all sim agents are egos
        sim_all = sim_features(ctx, padded, every_agent)
        valid = ctx.log_valid[:, None]  # [1, 1, S, T]
        far = torch.full_like(sim_all.distance_to_nearest_object, float("inf"))
        min_distance = torch.where(valid, sim_all.distance_to_nearest_object, far).amin(-1)[0]
        max_edge = torch.where(valid, sim_all.distance_to_road_edge, -far).amax(-1)[0]

        # Single-rollout metametric: rollouts become the batch axis, each with R = 1.
        log = log_features(ctx, ctx.eval_index)
        # Every agent's features include the evaluated agents': take theirs instead of recomputing.
        sim = type(sim_all)(**{k: gather_agents(v, ctx.eval_index) for k, v in vars(sim_all).items()})
        per_rollout = lambda x: x.transpose(0, 1)  # [1, R, ...] -> [R, 1, ...]
        repeat = lambda x: x.expand(r, *x.shape[1:])
        sim_r = type(sim)(**{k: per_rollout(v) for k, v in vars(sim).items()})
        log_r = type(log)(**{k: repeat(v) for k, v in vars(log).items()})
        log_valid = gather_agents(ctx.log_valid[:, None], ctx.eval_index)[:, 0]
        is_vehicle = torch.gather(ctx.is_vehicle, 1, ctx.eval_index)
        metrics = score(log_r, sim_r, repeat(log_valid), repeat(ctx.eval_mask), repeat(is_vehicle),
                        repeat(ctx.valid_steps), specs)
    eval_mask = torch.zeros(s, dtype=torch.bool, device=device)
    eval_mask[ctx.eval_index[0]] = True
    return RolloutSignals(
        collision=min_distance < 0,
        offroad=max_edge > 0,
        realism=metrics["metametric"],
        min_distance_to_object=min_distance,
        max_distance_to_road_edge=max_edge,
        likelihoods={k: v for k, v in metrics.items() if k.endswith("_likelihood")},
        eval_mask=eval_mask,
    )


def signals_summary(signals: RolloutSignals) -> dict[str, float]:
    """Scalar summaries for logging: mean realism and collision / off-road rates (all agents)."""
    return {"realism": float(signals.realism.mean()),
            "collision_rate": float(signals.collision.float().mean()),
            "offroad_rate": float(signals.offroad.float().mean()),
            "eval_collision_rate": float(np.mean(signals.collision[:, signals.eval_mask].cpu().numpy()))}


@dataclass(frozen=True)
class StepEvents:
    """Per-step event flags of one rollout, bool [S, 80]: collision (signed box distance to the
    nearest object < 0) and off-road (a box corner beyond the road edge)."""

    collision: np.ndarray
    offroad: np.ndarray


def step_events(record: ScenarioRecord, rollout: np.ndarray) -> StepEvents:
    """Flags of one rollout [S, 80, 4], from the fast WOSAC features (`smart_r1.metrics.features`),
    for drawing *when* an event happens.

    Those are the official definitions (rounded-corner boxes, convexity-aware road-edge sign), for
    every sim agent as ego, at every step; `rollout_signals` gives the same flags reduced over
    time (at log-valid steps).
    """
    with torch.no_grad():
        padded = pad_states([record], [rollout[None]], "cpu")  # [1, 1, S, 80, 4]
        every_agent = torch.arange(padded.shape[2])[None]  # [1, S]
        features = sim_features(build_context([record], "cpu"), padded, every_agent)
    return StepEvents(collision=features.collision_per_step[0, 0].numpy(),
                      offroad=features.offroad_per_step[0, 0].numpy())


def path_lengths(record: ScenarioRecord, states) -> tuple[torch.Tensor, torch.Tensor]:
    """(simulated [R, S], logged [S]) path lengths of the sim agents over the 8 s future, each
    counted on the steps where the agent's logged displacement is known (both ends log-valid), the
    simulated path starting from the logged current position. states: [R, S, 80, 4]."""
    sim = torch.as_tensor(np.asarray(states) if not isinstance(states, torch.Tensor) else states)
    sim = sim[..., :2].double().cpu()  # [R, S, 80, 2]
    agents, c = record.sim_agent_mask, record.current_time_index
    log = torch.as_tensor(record.xyz[agents][:, c:, :2]).double()  # [S, 81, 2]: now, then the future
    valid = torch.as_tensor(record.valid[agents][:, c:])  # [S, 81]
    counted = valid[:, 1:] & valid[:, :-1]  # [S, 80]
    log_length = ((log[:, 1:] - log[:, :-1]).norm(dim=-1) * counted).sum(-1)  # [S]
    path = torch.cat([log[None, :, :1].expand(sim.shape[0], -1, -1, -1), sim], dim=2)  # [R, S, 81, 2]
    sim_length = ((path[:, :, 1:] - path[:, :, :-1]).norm(dim=-1) * counted).sum(-1)  # [R, S]
    return sim_length, log_length


def progress(record: ScenarioRecord, states, min_log_metres: float = 1.0, both_ways: bool = False) -> torch.Tensor:
    """float [R, S] in [0, 1]: how much of its logged distance each sim agent travels,
    min(1, simulated / logged path length); 1 for an agent whose log moves under `min_log_metres`
    (nothing to keep up with). A reward term that stops RFT from buying safety by standing still.

    both_ways: also charge travelling further than the log, min(s / l, l / s) with both lengths
    floored at `min_log_metres`: a factor too far costs what a factor too short does, and an agent
    parked in the log that the simulation drives away is charged too."""
    sim, log = path_lengths(record, states)
    if both_ways:
        s, l = sim.clamp_min(min_log_metres), log.clamp_min(min_log_metres)
        return torch.minimum(s / l, l / s).float()
    moving = log >= min_log_metres
    return torch.where(moving, (sim / log.clamp_min(min_log_metres)).clamp(max=1.0), torch.ones_like(sim)).float()


def travel_ratio(record: ScenarioRecord, states) -> float | None:
    """How far the sim agents travel in the 8 s future against the log, a diagnostic of slowing
    down (not a WOSAC metric): the simulated path length summed over rollouts and agents over R
    times the logged path length (`path_lengths`). 1: as far as the log; below 1: slower. None when
    the logged agents barely move (under 1 m in all). states: [R, S, 80, 4]."""
    sim, log = path_lengths(record, states)
    if log.sum() < 1.0:
        return None
    return float(sim.sum() / (sim.shape[0] * log.sum()))


def mean_travel_ratio(records) -> float | None:
    """The mean `travel_ratio` of per-scenario records (dicts) that have one; None when none has."""
    ratios = [r["travel_ratio"] for r in records if r.get("travel_ratio") is not None]
    return sum(ratios) / len(ratios) if ratios else None
