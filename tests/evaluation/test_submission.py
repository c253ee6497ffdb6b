"""Leaderboard submission export on the real scenario with the official test submission."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from waymo_open_dataset.protos import sim_agents_submission_pb2 as submission_pb2
from waymo_open_dataset.utils.sim_agents import submission_specs

from smart_r1.data.womd import scenario_to_proto
from smart_r1.evaluation.submission import (
    SubmissionInfo, SubmissionWriter, read_rollouts, validate_rollouts,
)

INFO = SubmissionInfo(account_name="someone@example.com", unique_method_name="smart-r1-test",
                      authors=("A. Author", "B. Author"), affiliation="Nowhere",
                      description="constant velocity", method_link="https://example.com",
                      num_model_parameters="7M")


@pytest.fixture(scope="module")
def official_rollouts() -> submission_pb2.ScenarioRollouts:
    from waymo_open_dataset.protos import scenario_pb2

    package = Path(scenario_pb2.__file__).resolve().parents[1]
    (rollouts,) = read_rollouts(package / "utils" / "sim_agents" / "testdata" / "test_submission.binproto")
    return rollouts


def _renamed(record, rollouts, scenario_id):
    """The same scene under another scenario id: a second scenario for the multi-shard test."""
    copy = submission_pb2.ScenarioRollouts()
    copy.CopyFrom(rollouts)
    copy.scenario_id = scenario_id
    return record.replace(scenario_id=scenario_id), copy


def test_export_writes_valid_shards_and_archive(womd_record, official_rollouts, tmp_path):
    second = _renamed(womd_record, official_rollouts, "second-scenario")
    with SubmissionWriter(tmp_path, INFO, scenarios_per_shard=1) as writer:
        writer.add(womd_record, official_rollouts)
        writer.add(*second)
    assert writer.archive == tmp_path / "submission.tar.gz"

    with tarfile.open(writer.archive) as tar:
        names = sorted(tar.getnames())
        assert names == ["submission.binproto-00000-of-00002", "submission.binproto-00001-of-00002"]
        shards = [submission_pb2.SimAgentsChallengeSubmission.FromString(tar.extractfile(n).read())
                  for n in names]
    assert not list(tmp_path.glob("*.partial"))
    scenarios = {womd_record.scenario_id: scenario_to_proto(womd_record),
                 "second-scenario": scenario_to_proto(second[0])}
    for shard in shards:
        assert shard.submission_type == submission_pb2.SimAgentsChallengeSubmission.SIM_AGENTS_SUBMISSION
        assert shard.account_name == INFO.account_name
        assert shard.unique_method_name == INFO.unique_method_name
        assert list(shard.authors) == list(INFO.authors)
        assert shard.num_model_parameters == "7M"
        assert shard.acknowledge_complies_with_closed_loop_requirement
        assert not shard.uses_lidar_data and not shard.uses_camera_data
        (rollouts,) = shard.scenario_rollouts
        # The official rules accept what was written, unchanged.
        submission_specs.validate_scenario_rollouts(rollouts, scenarios[rollouts.scenario_id])
        assert rollouts.joint_scenes[0].simulated_trajectories[0].center_x[:5] == \
            official_rollouts.joint_scenes[0].simulated_trajectories[0].center_x[:5]
    # The archive reads back as the two scenarios' rollouts.
    assert [r.scenario_id for r in read_rollouts(writer.archive)] == [womd_record.scenario_id, "second-scenario"]


def test_one_shard_by_default(womd_record, official_rollouts, tmp_path):
    with SubmissionWriter(tmp_path, INFO) as writer:
        writer.add(womd_record, official_rollouts)
    shards = sorted(p.name for p in tmp_path.glob("submission.binproto-*"))
    assert shards == ["submission.binproto-00000-of-00001"]
    assert re.fullmatch(r"submission\.binproto-\d{5}-of-\d{5}", shards[0])


def _broken(rollouts, change):
    copy = submission_pb2.ScenarioRollouts()
    copy.CopyFrom(rollouts)
    change(copy)
    return copy


def test_invalid_rollouts_are_refused_with_a_reason(womd_record, official_rollouts):
    def wrong_id(r):
        r.joint_scenes[4].simulated_trajectories[0].object_id = 999_999_999

    def too_few(r):
        del r.joint_scenes[31]

    def short(r):
        del r.joint_scenes[0].simulated_trajectories[2].heading[79]

    def nan(r):
        r.joint_scenes[7].simulated_trajectories[3].center_y[10] = float("nan")

    def missing(r):
        del r.joint_scenes[0].simulated_trajectories[5]

    cases = {wrong_id: "999999999 is not a sim agent", too_few: "Incorrect number of parallel",
             short: "heading tensor length", nan: "non-finite center_y", missing: "are missing"}
    for change, message in cases.items():
        with pytest.raises(ValueError, match=message):
            validate_rollouts(womd_record, _broken(official_rollouts, change))
    other = _broken(official_rollouts, lambda r: setattr(r, "scenario_id", "another"))
    with pytest.raises(ValueError, match="rollouts are for scenario 'another'"):
        validate_rollouts(womd_record, other)


def test_writer_refuses_duplicates_empty_and_bad_metadata(womd_record, official_rollouts, tmp_path):
    writer = SubmissionWriter(tmp_path / "a", INFO)
    writer.add(womd_record, official_rollouts)
    with pytest.raises(ValueError, match="already added"):
        writer.add(womd_record, official_rollouts)
    with pytest.raises(ValueError, match="no scenario"):
        SubmissionWriter(tmp_path / "b", INFO).close()
    with pytest.raises(ValueError, match="account name"):
        SubmissionWriter(tmp_path / "c", SubmissionInfo(account_name=" ", unique_method_name="m"))
    writer.close()
    with pytest.raises(ValueError, match="already holds submission shards"):
        SubmissionWriter(tmp_path / "a", INFO)


def test_read_rollouts_takes_a_bare_scenario_rollouts(official_rollouts, tmp_path):
    path = tmp_path / "r.binproto"
    path.write_bytes(official_rollouts.SerializeToString())
    (back,) = read_rollouts(path)
    assert back == official_rollouts
    with pytest.raises(FileNotFoundError):
        read_rollouts(tmp_path / "absent.binproto")
    assert np.isfinite(back.joint_scenes[0].simulated_trajectories[0].center_x).all()
    damaged = tmp_path / "damaged.tar.gz"
    damaged.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match="not a readable submission archive"):
        read_rollouts(damaged)
