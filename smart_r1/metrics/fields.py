"""The WOSAC `SimAgentMetrics` field names, in the proto's order, shared by both implementations."""

from __future__ import annotations

# The ten features scored by likelihood; each has a `<name>_likelihood` field and a config entry.
FEATURE_NAMES = (
    "linear_speed", "linear_acceleration", "angular_speed", "angular_acceleration",
    "distance_to_nearest_object", "collision_indication", "time_to_collision",
    "distance_to_road_edge", "offroad_indication", "traffic_light_violation",
)
LIKELIHOOD_FIELDS = tuple(f"{name}_likelihood" for name in FEATURE_NAMES)

# Every numeric field of `SimAgentMetrics` (all but `scenario_id`), in the proto's order.
METRIC_FIELDS = (
    "metametric", "average_displacement_error", "min_average_displacement_error",
    *LIKELIHOOD_FIELDS,
    "simulated_collision_rate", "simulated_offroad_rate", "simulated_traffic_light_violation_rate",
)
