"""Waymo's official WOSAC 2025 sim-agents evaluator (TensorFlow), wrapped.

Slow (tens of seconds per scenario with 32 rollouts on a 2-core machine): for final reports and
as the oracle of the agreement tests. RL rewards use the PyTorch path in `smart_r1.metrics`.

The official `metrics.load_metrics_config()` opens a path relative to the working directory, so
the 2025 config is read here from the installed package's folder.

glibc returns TensorFlow's large buffers to the kernel after every op unless the MALLOC_*
variables below are set before the process starts; the evaluator then runs about 2x faster.
They cannot take effect in an already running process, so they are set for Ray workers here and
exported by the Makefile for tests and benchmarks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from google.protobuf import text_format
from waymo_open_dataset.protos import scenario_pb2, sim_agents_metrics_pb2
from waymo_open_dataset.protos import sim_agents_submission_pb2 as submission_pb2

from smart_r1.data.womd import scenario_from_proto, scenario_to_proto
from smart_r1.metrics.fields import METRIC_FIELDS
from smart_r1.metrics.rollouts_io import scenario_rollouts_to_states
from smart_r1.types import ScenarioRecord

MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "17179869184",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
    "MALLOC_TOP_PAD_": "1073741824",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}

def reexec_with_malloc_env() -> None:
    """Restart this script with MALLOC_ENV set, unless it already is (glibc reads them at
    start-up only). For command-line scripts that run the official evaluator in-process."""
    import sys

    if any(k not in os.environ for k in MALLOC_ENV):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**MALLOC_ENV, **os.environ})


_CONFIG_NAME = "challenge_2025_sim_agents_config.textproto"


def config_2025_path() -> Path:
    """The 2025 sim-agents config textproto inside the installed waymo package."""
    # waymo_open_dataset is a namespace package (no __file__): locate it through a module of it.
    package = Path(scenario_pb2.__file__).resolve().parents[1]
    return package / "wdl_limited" / "sim_agents_metrics" / _CONFIG_NAME


def load_2025_config() -> sim_agents_metrics_pb2.SimAgentMetricsConfig:
    """The official WOSAC 2025 `SimAgentMetricsConfig` (histograms, smoothing, weights)."""
    config = sim_agents_metrics_pb2.SimAgentMetricsConfig()
    text_format.Parse(config_2025_path().read_text(), config)
    return config


def _as_pair(scenario: ScenarioRecord | scenario_pb2.Scenario) -> tuple[ScenarioRecord, scenario_pb2.Scenario]:
    if isinstance(scenario, scenario_pb2.Scenario):
        return scenario_from_proto(scenario).validate(), scenario
    return scenario, scenario_to_proto(scenario)


def metrics_to_dict(metrics: sim_agents_metrics_pb2.SimAgentMetrics) -> dict[str, float]:
    """A `SimAgentMetrics` proto as {field name: float} (all numeric fields)."""
    return {name: float(getattr(metrics, name)) for name in METRIC_FIELDS}


def official_scenario_metrics(
    scenario: ScenarioRecord | scenario_pb2.Scenario,
    rollouts: submission_pb2.ScenarioRollouts,
    config: sim_agents_metrics_pb2.SimAgentMetricsConfig | None = None,
) -> dict[str, float]:
    """Run the official evaluator on one scenario; {SimAgentMetrics field: value}.

    The rollouts are checked first (ValueError on a wrong scenario id, missing or extra agents,
    wrong step counts, non-finite values), because the evaluator itself fails obscurely on those.
    Any number of rollouts is accepted (the challenge requires 32).
    """
    from waymo_open_dataset.wdl_limited.sim_agents_metrics import metrics as wosac_metrics

    record, proto = _as_pair(scenario)
    scenario_rollouts_to_states(record, rollouts)  # validation only
    result = wosac_metrics.compute_scenario_metrics_for_bundle(
        config or load_2025_config(), proto, rollouts)
    return metrics_to_dict(result)


def _official_from_bytes(scenario_bytes: bytes, rollouts_bytes: bytes, config_text: str) -> dict[str, float]:
    config = text_format.Parse(config_text, sim_agents_metrics_pb2.SimAgentMetricsConfig())
    return official_scenario_metrics(scenario_pb2.Scenario.FromString(scenario_bytes),
                                     submission_pb2.ScenarioRollouts.FromString(rollouts_bytes), config)


def official_metrics_parallel(
    pairs: Iterable[tuple[ScenarioRecord | scenario_pb2.Scenario, submission_pb2.ScenarioRollouts]],
    num_workers: int | None = None,
    config: sim_agents_metrics_pb2.SimAgentMetricsConfig | None = None,
) -> list[dict[str, float]]:
    """The official metrics of many (scenario, rollouts) pairs, one Ray task per scenario.

    Uses Ray if this process already initialised it, else starts a private local instance with
    `num_workers` CPUs (default: all) and leaves it running for later calls. Results keep the
    input order.
    """
    import ray

    from smart_r1.ray_runtime import ensure_ray

    config_text = text_format.MessageToString(config or load_2025_config())
    # Workers inherit the driver's environment: the allocator variables are set before they start.
    ensure_ray(num_workers, private=True, env=MALLOC_ENV)
    task = ray.remote(num_cpus=1)(_official_from_bytes)
    refs = []
    for scenario, rollouts in pairs:
        proto = scenario if isinstance(scenario, scenario_pb2.Scenario) else scenario_to_proto(scenario)
        refs.append(task.remote(proto.SerializeToString(), rollouts.SerializeToString(), config_text))
    return ray.get(refs)


def aggregate_official(results: list[dict[str, float]]) -> dict[str, float]:
    """Dataset-level metrics through the official `aggregate_scenario_metrics` (for cross-checks)."""
    from waymo_open_dataset.wdl_limited.sim_agents_metrics import metrics as wosac_metrics

    protos = [sim_agents_metrics_pb2.SimAgentMetrics(scenario_id=str(i), **r) for i, r in enumerate(results)]
    return metrics_to_dict(wosac_metrics.aggregate_scenario_metrics(protos))
