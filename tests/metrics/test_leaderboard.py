"""The leaderboard table against hand-computed numbers and the official bucketing code."""

from __future__ import annotations

import math

import pytest

from smart_r1.metrics.leaderboard import aggregate_metrics, leaderboard, metametric_weights
from smart_r1.metrics.fields import METRIC_FIELDS


def _scenario(**values) -> dict[str, float]:
    out = {name: 0.5 for name in METRIC_FIELDS}
    out.update(values)
    return out


# Scenario A's likelihoods differ per feature; scenario B's are all 0.5.
A = _scenario(linear_speed_likelihood=0.4, linear_acceleration_likelihood=0.2,
              angular_speed_likelihood=0.6, angular_acceleration_likelihood=0.8,
              distance_to_nearest_object_likelihood=0.3, collision_indication_likelihood=0.9,
              time_to_collision_likelihood=0.5, distance_to_road_edge_likelihood=0.6,
              offroad_indication_likelihood=0.8, traffic_light_violation_likelihood=1.0,
              metametric=0.61, min_average_displacement_error=1.0, average_displacement_error=3.0,
              simulated_collision_rate=0.25, simulated_offroad_rate=0.0,
              simulated_traffic_light_violation_rate=0.1)
B = _scenario(metametric=0.5, min_average_displacement_error=2.0, average_displacement_error=4.0,
              simulated_collision_rate=0.75, simulated_offroad_rate=0.5,
              simulated_traffic_light_violation_rate=0.0)


def test_2025_weights():
    w = metametric_weights()
    assert w["collision_indication"] == pytest.approx(0.25)
    assert w["offroad_indication"] == pytest.approx(0.25)
    assert w["distance_to_nearest_object"] == pytest.approx(0.1)
    assert w["time_to_collision"] == pytest.approx(0.1)
    assert w["linear_speed"] == pytest.approx(0.05)
    assert sum(w.values()) == pytest.approx(1.0)


def test_leaderboard_by_hand():
    row = leaderboard([A, B])
    # Kinematic: equal weights 0.05 -> the plain mean; A: (0.4+0.2+0.6+0.8)/4 = 0.5, B: 0.5.
    assert row.kinematic_metrics == pytest.approx(0.5)
    # Interactive, weights 0.1 / 0.25 / 0.1 (sum 0.45), on the mean likelihoods 0.4, 0.7, 0.5:
    # (0.04 + 0.175 + 0.05) / 0.45 = 0.58889.
    assert row.interactive_metrics == pytest.approx(0.265 / 0.45)
    # Map-based, weights 0.05 / 0.25 / 0.05 (sum 0.35), mean likelihoods 0.55, 0.65, 0.75:
    # (0.0275 + 0.1625 + 0.0375) / 0.35 = 0.65.
    assert row.map_based_metrics == pytest.approx(0.65)
    assert row.realism_meta_metric == pytest.approx(0.555)
    assert row.min_ade == pytest.approx(1.5)
    assert row.simulated_collision_rate == pytest.approx(0.5)
    assert row.simulated_offroad_rate == pytest.approx(0.25)
    assert row.simulated_traffic_light_violation_rate == pytest.approx(0.05)
    assert row.num_scenarios == 2
    flat = row.to_dict()
    assert flat["metametric"] == pytest.approx(0.555)
    assert flat["collision_indication_likelihood"] == pytest.approx(0.7)
    assert flat["average_displacement_error"] == pytest.approx(3.5)
    table = row.format_table()
    for label in ("Realism Meta", "Kinematic", "Interactive", "Map-based", "minADE",
                  "traffic_light_violation_likelihood", "simulated_offroad_rate"):
        assert label in table
    assert "0.5889" in table and "0.5550" in table


def test_matches_the_official_aggregation_and_buckets():
    from waymo_open_dataset.protos import sim_agents_metrics_pb2
    from waymo_open_dataset.wdl_limited.sim_agents_metrics import metrics as wosac_metrics

    from smart_r1.metrics.official import load_2025_config

    protos = [sim_agents_metrics_pb2.SimAgentMetrics(scenario_id=str(i), **m) for i, m in enumerate([A, B])]
    official = wosac_metrics.aggregate_metrics_to_buckets(
        load_2025_config(), wosac_metrics.aggregate_scenario_metrics(protos))
    row = leaderboard([A, B])
    for name in ("realism_meta_metric", "kinematic_metrics", "interactive_metrics", "map_based_metrics",
                 "min_ade", "simulated_collision_rate", "simulated_offroad_rate",
                 "simulated_traffic_light_violation_rate"):
        assert getattr(row, name) == pytest.approx(getattr(official, name), rel=1e-5, abs=1e-6), name


def test_bad_metrics_are_named():
    with pytest.raises(ValueError, match="no scenario"):
        aggregate_metrics([])
    broken = dict(B)
    del broken["time_to_collision_likelihood"]
    with pytest.raises(ValueError, match="scenario 1: metrics lack the field 'time_to_collision_likelihood'"):
        aggregate_metrics([A, broken])
    with pytest.raises(ValueError, match="scenario 0: metametric is nan"):
        aggregate_metrics([_scenario(metametric=math.nan)])
