"""Dataset-level WOSAC metrics: the one aggregation of per-scenario metrics (used by the pipeline,
the sweep, `smart-r1 evaluate`), and the leaderboard row with the official bucket names.

Dataset level, as the official evaluator does it
(`waymo_open_dataset/wdl_limited/sim_agents_metrics/metrics.py`):
    - `aggregate_scenario_metrics`: every `SimAgentMetrics` field is the plain mean over scenarios.
    - `aggregate_metrics_to_buckets`: each category score is the metametric-weighted average of
      its likelihoods, normalised by the weights' sum within the category,
          category = sum_f w_f * likelihood_f / sum_f w_f,   f in the category,
      with the categories of `_METRIC_FIELD_NAMES_BY_BUCKET` (kinematic, interactive, map-based)
      and the weights `metametric_weight` of the 2025 config
      (`challenge_2025_sim_agents_config.textproto`).
The realism meta metric itself is the mean of the per-scenario `metametric` (whose weights sum
to 1), and minADE the mean of `min_average_displacement_error`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from smart_r1.metrics.fields import FEATURE_NAMES, METRIC_FIELDS
from smart_r1.metrics.tables import markdown_table

# `_METRIC_FIELD_NAMES_BY_BUCKET` in the official metrics.py, in its order.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "kinematic": ("linear_speed", "linear_acceleration", "angular_speed", "angular_acceleration"),
    "interactive": ("distance_to_nearest_object", "collision_indication", "time_to_collision"),
    "map_based": ("distance_to_road_edge", "offroad_indication", "traffic_light_violation"),
}
RATE_FIELDS = ("simulated_collision_rate", "simulated_offroad_rate", "simulated_traffic_light_violation_rate")
# The category scores' names in the official `SimAgentsBucketedMetrics`.
CATEGORY_FIELDS = {category: f"{category}_metrics" for category in CATEGORIES}
_WEIGHTS: dict[str, float] = {}  # the 2025 config's metametric weights, read once


def metametric_weights(config=None) -> dict[str, float]:
    """{feature name: metametric_weight} from the 2025 config (or the given SimAgentMetricsConfig)."""
    if config is None:
        from smart_r1.metrics.official import load_2025_config

        config = load_2025_config()
    return {name: float(getattr(config, name).metametric_weight) for name in FEATURE_NAMES}


def with_categories(metrics: Mapping[str, float]) -> dict[str, float]:
    """`metrics` (one scenario's, or a data set's means) plus its category scores under their
    official names (kinematic_metrics, interactive_metrics, map_based_metrics), with the 2025
    config's weights. The categories are linear in the likelihoods, so the mean over scenarios of a
    scenario's category score is the data set's."""
    if not _WEIGHTS:
        _WEIGHTS.update(metametric_weights())
    return {**metrics, **{CATEGORY_FIELDS[c]: v for c, v in category_scores(metrics, _WEIGHTS).items()}}


def aggregate_metrics(per_scenario: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Dataset-level metrics as the official `aggregate_scenario_metrics` computes them: the plain
    mean over scenarios of every `SimAgentMetrics` field (the metametric too, not recomputed), and
    the category scores of those means (`with_categories`).

    Raises ValueError on no scenario, a missing field or a non-finite value (naming the scenario's
    position), since one NaN would silently turn the whole table into NaN.
    """
    if not per_scenario:
        raise ValueError("no scenario metrics to aggregate")
    out = {}
    for name in METRIC_FIELDS:
        values = []
        for i, metrics in enumerate(per_scenario):
            if name not in metrics:
                raise ValueError(f"scenario {i}: metrics lack the field {name!r}")
            value = float(metrics[name])
            if not math.isfinite(value):
                raise ValueError(f"scenario {i}: {name} is {value}")
            values.append(value)
        out[name] = sum(values) / len(values)
    return with_categories(out)


@dataclass(frozen=True)
class Leaderboard:
    """One row of the WOSAC 2025 leaderboard.

    realism_meta_metric, kinematic_metrics, interactive_metrics, map_based_metrics, min_ade and
    the rates carry the names of the official `SimAgentsBucketedMetrics`; `metrics` holds every
    aggregated `SimAgentMetrics` field (likelihoods, ADE, rates); `num_scenarios` how many were
    averaged.
    """

    realism_meta_metric: float
    kinematic_metrics: float
    interactive_metrics: float
    map_based_metrics: float
    min_ade: float
    simulated_collision_rate: float
    simulated_offroad_rate: float
    simulated_traffic_light_violation_rate: float
    metrics: dict[str, float]
    num_scenarios: int

    def to_dict(self) -> dict[str, float]:
        """Flat JSON-ready dict: the bucketed names plus every `SimAgentMetrics` field."""
        out = {k: v for k, v in vars(self).items() if k != "metrics"}
        out.update(self.metrics)
        return out

    def format_table(self) -> str:
        """The leaderboard's columns, then every likelihood and rate, as a markdown table."""
        rows = [("Realism Meta", self.realism_meta_metric), ("Kinematic", self.kinematic_metrics),
                ("Interactive", self.interactive_metrics), ("Map-based", self.map_based_metrics),
                ("minADE (m)", self.min_ade), ("ADE (m)", self.metrics["average_displacement_error"])]
        rows += [(f"{name}_likelihood", self.metrics[f"{name}_likelihood"])
                 for names in CATEGORIES.values() for name in names]
        rows += [(name, self.metrics[name]) for name in RATE_FIELDS]
        return (f"WOSAC 2025 sim agents, {self.num_scenarios} scenario(s)\n"
                + markdown_table(("metric", "value"), [(label, f"{value:.4f}") for label, value in rows]))


def category_scores(metrics: Mapping[str, float], weights: Mapping[str, float]) -> dict[str, float]:
    """{category: weighted mean of its likelihoods} (official `aggregate_metrics_to_buckets`)."""
    out = {}
    for category, names in CATEGORIES.items():
        total = sum(weights[name] for name in names)
        if total == 0:
            raise ValueError(f"the config gives the {category} metrics a zero total weight")
        out[category] = sum(weights[name] * metrics[f"{name}_likelihood"] for name in names) / total
    return out


def leaderboard(per_scenario: Sequence[Mapping[str, float]], config=None) -> Leaderboard:
    """The leaderboard row of a dataset from its per-scenario `SimAgentMetrics` dicts."""
    metrics = aggregate_metrics(per_scenario)
    scores = category_scores(metrics, metametric_weights(config))
    return Leaderboard(
        realism_meta_metric=metrics["metametric"], kinematic_metrics=scores["kinematic"],
        interactive_metrics=scores["interactive"], map_based_metrics=scores["map_based"],
        min_ade=metrics["min_average_displacement_error"],
        **{name: metrics[name] for name in RATE_FIELDS}, metrics=metrics,
        num_scenarios=len(per_scenario))
