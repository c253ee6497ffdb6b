"""WOSAC 2025 scenario metrics in PyTorch: the public entry points and the scoring.

Scoring follows `metrics.compute_scenario_metrics_for_features_bundle` of the official evaluator:
each feature's likelihood is exp(mean log-likelihood of the logged values under the simulated
distribution) over valid (object, step) pairs of a scenario; "valid" is the logged validity of
the future steps only, so a speed needs both neighbouring future steps valid (never at the
first or last step), an acceleration two levels of that; the time-to-collision and traffic-light likelihoods
count vehicles only; collision, off-road and traffic-light indications are "any valid step" per
object, scored with Bernoulli estimators; the metametric is the config-weighted sum of the ten
likelihoods. The simulated collision, off-road and traffic-light violation rates count every
evaluated object, whatever its type, at its logged valid steps. ADE divides by the object's
valid logged steps over all 91 steps, as the official code does.

Shapes: B scenarios, R rollouts, S sim agents, E evaluated agents, T = 80 steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from smart_r1.metrics.context import MetricContext, build_context
from smart_r1.metrics.estimators import FeatureSpec, feature_specs, log_likelihood, scenario_level_log_likelihood
from smart_r1.metrics.features import MetricFeatures, log_features, sim_features
from smart_r1.metrics.features_interaction import gather_agents
from smart_r1.metrics.features_kinematic import kinematic_validity
from smart_r1.metrics.fields import FEATURE_NAMES, METRIC_FIELDS
from smart_r1.metrics.rollouts_io import check_states
from smart_r1.types import ScenarioRecord

_SPECS_CACHE: dict[int, dict[str, FeatureSpec]] = {}


def default_specs(config=None) -> dict[str, FeatureSpec]:
    """Feature specs of `config`, or of the official 2025 config read from the waymo package."""
    if config is not None:
        return feature_specs(config)
    if 0 not in _SPECS_CACHE:
        from smart_r1.metrics.official import load_2025_config

        _SPECS_CACHE[0] = feature_specs(load_2025_config())
    return _SPECS_CACHE[0]


def _mean_where(values: torch.Tensor, mask: torch.Tensor, dims) -> torch.Tensor:
    """Mean of `values` over `dims` where `mask` (broadcast); NaN where nothing is valid."""
    mask = mask.expand_as(values)
    total = torch.where(mask, values, torch.zeros_like(values)).sum(dims)
    return total / mask.sum(dims).to(values.dtype)


def score(log: MetricFeatures, sim: MetricFeatures, log_valid: torch.Tensor, eval_mask: torch.Tensor,
          is_vehicle: torch.Tensor, valid_steps: torch.Tensor, specs: dict[str, FeatureSpec]
          ) -> dict[str, torch.Tensor]:
    """{SimAgentMetrics field: float [B]} from log features (R = 1) and sim features.

    log_valid: bool [B, E, T] logged validity of the evaluated agents; eval_mask: bool [B, E]
    (False for padding); is_vehicle: bool [B, E]; valid_steps: float [B, E] (ADE divisor).
    """
    valid = log_valid & eval_mask[..., None]
    speed_valid, accel_valid = kinematic_validity(valid)
    vehicle_valid = valid & is_vehicle[..., None]
    all_dims = (-2, -1)
    out = {}

    def series(name, mask):
        ll = log_likelihood(getattr(log, name)[:, 0], getattr(sim, name), specs[name])
        out[f"{name}_likelihood"] = torch.exp(_mean_where(ll, mask, all_dims))

    series("linear_speed", speed_valid)
    series("angular_speed", speed_valid)
    series("linear_acceleration", accel_valid)
    series("angular_acceleration", accel_valid)
    series("distance_to_nearest_object", valid)
    series("time_to_collision", vehicle_valid)
    series("distance_to_road_edge", valid)

    def indication(per_step, mask):
        return (per_step & mask[:, None]).any(-1)  # [B, R, E]

    indications = {
        "collision_indication": (indication(log.collision_per_step, valid), indication(sim.collision_per_step, valid)),
        "offroad_indication": (indication(log.offroad_per_step, valid), indication(sim.offroad_per_step, valid)),
        "traffic_light_violation": (indication(log.traffic_light_violation_per_step, vehicle_valid),
                                    indication(sim.traffic_light_violation_per_step, vehicle_valid)),
    }
    for name, (log_ind, sim_ind) in indications.items():
        ll = scenario_level_log_likelihood(log_ind[:, 0], sim_ind, specs[name])  # [B, E]
        out[f"{name}_likelihood"] = torch.exp(_mean_where(ll, eval_mask, -1))

    rollout_mask = eval_mask[:, None].expand_as(indications["collision_indication"][1])
    rate = lambda ind: _mean_where(ind.float(), rollout_mask, (-2, -1))
    out["simulated_collision_rate"] = rate(indications["collision_indication"][1])
    out["simulated_offroad_rate"] = rate(indications["offroad_indication"][1])
    # The official rate masks by logged validity only (no vehicle filter), unlike its likelihood:
    # pedestrians and cyclists count (features_map.red_light_violation ignores types).
    out["simulated_traffic_light_violation_rate"] = rate(indication(sim.traffic_light_violation_per_step, valid))

    ade = sim.displacement.sum(-1) / valid_steps[:, None]  # [B, R, E]
    out["average_displacement_error"] = _mean_where(ade, rollout_mask, (-2, -1))
    per_rollout = _mean_where(ade, eval_mask[:, None], -1)  # [B, R]
    out["min_average_displacement_error"] = per_rollout.amin(-1)
    out["metametric"] = sum(specs[name].weight * out[f"{name}_likelihood"] for name in FEATURE_NAMES)
    return {name: out[name] for name in METRIC_FIELDS}


def pad_states(records: Sequence[ScenarioRecord], states: Sequence, device) -> torch.Tensor:
    """Checked per-scenario states [R, S_i, 80, 4] -> float32 [B, R, S, 80, 4] (zero padding)."""
    checked = [torch.as_tensor(check_states(rec, st), dtype=torch.float32)
               if not isinstance(st, torch.Tensor) else _check_tensor(rec, st)
               for rec, st in zip(records, states)]
    rollouts = {c.shape[0] for c in checked}
    if len(rollouts) != 1:
        raise ValueError(f"all scenarios of a batch need the same number of rollouts, got {sorted(rollouts)}")
    s = max(c.shape[1] for c in checked)
    out = torch.zeros((len(checked), rollouts.pop(), s, *checked[0].shape[2:]), dtype=torch.float32, device=device)
    for i, c in enumerate(checked):
        out[i, :, : c.shape[1]] = c.to(device=device, dtype=torch.float32)
    return out


def _check_tensor(record: ScenarioRecord, states: torch.Tensor) -> torch.Tensor:
    """Shape and finiteness checks of `check_states`, without leaving the tensor's device."""
    if states.dim() != 4 or states.shape[2:] != (80, 4) or states.shape[1] != int(record.sim_agent_mask.sum()):
        check_states(record, states.detach().cpu().numpy())  # raises with the precise message
    if not torch.isfinite(states).all():
        check_states(record, states.detach().cpu().numpy())
    return states


def metrics_and_features(ctx: MetricContext, states: torch.Tensor, specs: dict[str, FeatureSpec]
             ) -> tuple[dict[str, torch.Tensor], MetricFeatures, MetricFeatures]:
    """Metrics {field: [B]} plus the log and sim features of the evaluated agents."""
    log = log_features(ctx, ctx.eval_index)
    sim = sim_features(ctx, states, ctx.eval_index)
    log_valid = gather_agents(ctx.log_valid[:, None], ctx.eval_index)[:, 0]
    is_vehicle = torch.gather(ctx.is_vehicle, 1, ctx.eval_index)
    return score(log, sim, log_valid, ctx.eval_mask, is_vehicle, ctx.valid_steps, specs), log, sim


def compute_metrics_batch(records: Sequence[ScenarioRecord], states: Sequence, config=None,
                          device: str | torch.device | None = None, context: MetricContext | None = None
                          ) -> list[dict[str, float]]:
    """WOSAC metrics of several scenarios in one padded batch, one dict per scenario.

    states: per scenario [R, S_i, 80, 4] (numpy or tensor; the same R for all), sim agents in
    `record.sim_agent_ids` order. Runs on `device` (default: the first tensor's device, else CPU).
    context: `build_context(records, device)`, when the caller scores the same scenarios often.
    """
    if device is None:
        device = next((s.device for s in states if isinstance(s, torch.Tensor)), torch.device("cpu"))
    padded = pad_states(records, states, device)
    with torch.no_grad():
        ctx = context if context is not None else build_context(records, device)
        metrics, _, _ = metrics_and_features(ctx, padded, default_specs(config))
    values = {name: v.double().cpu().numpy() for name, v in metrics.items()}
    return [{name: float(values[name][i]) for name in METRIC_FIELDS} for i in range(len(records))]


def compute_scenario_metrics(record: ScenarioRecord, states, config=None) -> dict[str, float]:
    """WOSAC metrics of one scenario: states [R, S, 80, 4] -> {SimAgentMetrics field: value}."""
    return compute_metrics_batch([record], [states], config)[0]
