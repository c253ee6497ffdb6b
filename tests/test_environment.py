"""The installed environment runs the official WOSAC evaluator (installed with --no-deps)."""

from __future__ import annotations

import importlib.resources

import pytest


@pytest.mark.slow
def test_official_evaluator_runs_on_real_scenario(womd_path):
    from google.protobuf import text_format
    from waymo_open_dataset.protos import sim_agents_metrics_pb2, sim_agents_submission_pb2
    from waymo_open_dataset.wdl_limited.sim_agents_metrics import metrics

    from smart_r1.data.womd import read_scenario_protos

    scenario = next(read_scenario_protos(womd_path))
    pkg = importlib.resources.files("waymo_open_dataset")
    submission = sim_agents_submission_pb2.SimAgentsChallengeSubmission.FromString(
        (pkg / "utils/sim_agents/testdata/test_submission.binproto").read_bytes())
    rollouts = submission.scenario_rollouts[0]
    assert rollouts.scenario_id == scenario.scenario_id
    del rollouts.joint_scenes[1:]  # one joint scene keeps this check quick
    config = text_format.Parse(
        (pkg / "wdl_limited/sim_agents_metrics/challenge_2025_sim_agents_config.textproto").read_text(),
        sim_agents_metrics_pb2.SimAgentMetricsConfig())
    result = metrics.compute_scenario_metrics_for_bundle(config, scenario, rollouts)
    assert result.scenario_id == scenario.scenario_id
    assert 0.0 < result.metametric < 1.0
    assert 0.0 <= result.simulated_collision_rate <= 1.0
    assert result.min_average_displacement_error > 0.0
