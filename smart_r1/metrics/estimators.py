"""Likelihood estimators of the WOSAC metric, configured by the official config proto.

Follows `estimators.py` of the official evaluator: values are clipped to [min_val, max_val]
and binned with `tfp.stats.find_bins` semantics (right-open bins, the last one closed, NaN in the
last bin, float32 edges from `tf.linspace`); the simulated histogram gets
`additive_smoothing_pseudocount` added to every bin and is normalised; each logged value scores
the log-probability of its bin. `independent_timesteps` pools all steps of all rollouts of an
object into one histogram; otherwise each step has its own histogram over rollouts. Bernoulli
features are histograms with the two bins [-0.5, 0.5), [0.5, 1.5].

Shapes: [..., R, E, T] simulated values, [..., E, T] logged values, same leading dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smart_r1.metrics.fields import FEATURE_NAMES


@dataclass(frozen=True)
class FeatureSpec:
    """One feature's estimator and metametric weight, read from `SimAgentMetricsConfig`."""

    name: str
    kind: str  # "histogram" or "bernoulli"
    min_val: float
    max_val: float
    num_bins: int
    pseudocount: float
    independent_timesteps: bool
    weight: float


def feature_specs(config) -> dict[str, FeatureSpec]:
    """{feature name: FeatureSpec} for the ten WOSAC features of `config`."""
    specs = {}
    for name in FEATURE_NAMES:
        entry = getattr(config, name)
        kind = entry.WhichOneof("estimator")
        if kind == "histogram":
            h = entry.histogram
            specs[name] = FeatureSpec(name, kind, h.min_val, h.max_val, h.num_bins,
                                      h.additive_smoothing_pseudocount, entry.independent_timesteps,
                                      entry.metametric_weight)
        elif kind == "bernoulli":
            specs[name] = FeatureSpec(name, kind, -0.5, 1.5, 2, entry.bernoulli.additive_smoothing_pseudocount,
                                      entry.independent_timesteps, entry.metametric_weight)
        else:
            raise ValueError(f"feature {name}: estimator {kind!r} is not supported (histogram, bernoulli)")
        if entry.aggregate_objects:
            raise ValueError(f"feature {name}: aggregate_objects (scenario-gen scoring) is not supported")
    return specs


def bin_edges(spec: FeatureSpec, device=None) -> torch.Tensor:
    """float32 [num_bins + 1], bit-identical to `tf.linspace(min_val, max_val, num_bins + 1)`."""
    lo = torch.tensor(spec.min_val, dtype=torch.float32, device=device)
    hi = torch.tensor(spec.max_val, dtype=torch.float32, device=device)
    edges = torch.arange(spec.num_bins + 1, dtype=torch.float32, device=device) * ((hi - lo) / spec.num_bins) + lo
    edges[-1] = hi
    return edges


def bin_index(values: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """int64, same shape: the histogram bin of each value (after clipping; NaN -> last bin)."""
    values = values.to(torch.float32)
    edges = bin_edges(spec, values.device)
    clipped = values.clamp(edges[0].item(), edges[-1].item())
    index = torch.searchsorted(edges, clipped.contiguous(), right=True) - 1
    index = index.clamp(0, spec.num_bins - 1)
    return torch.where(torch.isnan(values), torch.full_like(index, spec.num_bins - 1), index)


def log_likelihood(log_values: torch.Tensor, sim_values: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """float [..., E, T]: log-probability of each logged value under the simulated histogram.

    log_values [..., E, T]; sim_values [..., R, E, T] (bool for Bernoulli features).
    """
    log_bins = bin_index(log_values.float(), spec)
    sim_bins = torch.nn.functional.one_hot(bin_index(sim_values.float(), spec), spec.num_bins).float()
    if spec.independent_timesteps:
        counts = sim_bins.sum(dim=(-4, -2))[..., None, :]  # [..., E, 1, bins]: one per object
    else:
        counts = sim_bins.sum(dim=-4)  # [..., E, T, bins]: one per object and step
    counts = counts + spec.pseudocount
    log_probs = torch.log(counts) - torch.log(counts.sum(-1, keepdim=True))
    log_probs = log_probs.expand(*log_bins.shape, spec.num_bins)
    return torch.gather(log_probs, -1, log_bins[..., None])[..., 0]


def scenario_level_log_likelihood(log_values: torch.Tensor, sim_values: torch.Tensor,
                                  spec: FeatureSpec) -> torch.Tensor:
    """float [..., E] for per-object values: log [..., E], sim [..., R, E] (a one-step series)."""
    return log_likelihood(log_values[..., None], sim_values[..., None], spec)[..., 0]
