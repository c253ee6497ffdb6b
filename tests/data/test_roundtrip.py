"""TFRecord -> Parquet -> record -> proto on the real WOMD scenario is exact."""

from __future__ import annotations

import numpy as np
import pytest

from smart_r1.data.parquet import read_shard, write_shard
from smart_r1.data.womd import read_scenario_protos, scenario_to_proto
from smart_r1.types import NUM_STEPS, ScenarioRecord


def _lane_states(dyn):
    return sorted((s.lane, s.state, s.stop_point.x, s.stop_point.y, s.stop_point.z) for s in dyn.lane_states)


def _feature_points(feature):
    which = feature.WhichOneof("feature_data")
    data = getattr(feature, which)
    if which == "stop_sign":
        pts = [data.position]
    else:
        pts = data.polyline if which in ("lane", "road_line", "road_edge") else data.polygon
    return which, [(p.x, p.y, p.z) for p in pts]


def test_record_fields(womd_record: ScenarioRecord):
    r = womd_record
    assert r.scenario_id == "637f20cafde22ff8"
    assert r.num_steps == NUM_STEPS and r.current_time_index == 10
    assert r.xyz.shape == (r.num_agents, NUM_STEPS, 3) and r.xyz.dtype == np.float64
    assert r.valid[r.sdc_index].all(), "the sdc is valid throughout"
    # WOSAC sim agents: exactly the tracks valid at the current step
    assert r.sim_agent_mask.sum() == r.valid[:, 10].sum() > 0
    assert (r.map_offsets[1:] >= r.map_offsets[:-1]).all()
    assert r.tl_state.shape == (NUM_STEPS, r.tl_lane_id.shape[0])


def test_tfrecord_parquet_record_proto_roundtrip(womd_path, womd_record, tmp_path):
    original = next(read_scenario_protos(womd_path))
    shard = write_shard(tmp_path / "one.parquet", [womd_record])
    (loaded,) = list(read_shard(shard))
    back = scenario_to_proto(loaded)

    assert back.scenario_id == original.scenario_id
    assert list(back.timestamps_seconds) == list(original.timestamps_seconds)
    assert back.current_time_index == original.current_time_index
    assert back.sdc_track_index == original.sdc_track_index
    assert list(back.objects_of_interest) == list(original.objects_of_interest)
    assert [(p.track_index, p.difficulty) for p in back.tracks_to_predict] == [
        (p.track_index, p.difficulty) for p in original.tracks_to_predict]
    fields = ("center_x", "center_y", "center_z", "length", "width", "height", "heading",
              "velocity_x", "velocity_y", "valid")
    assert len(back.tracks) == len(original.tracks)
    for a, b in zip(original.tracks, back.tracks):
        assert (a.id, a.object_type) == (b.id, b.object_type)
        got = [[getattr(s, f) for f in fields] for s in b.states]
        want = [[getattr(s, f) for f in fields] for s in a.states]
        assert got == want, f"track {a.id} differs"
    assert len(back.map_features) == len(original.map_features)
    for a, b in zip(original.map_features, back.map_features):
        assert a.id == b.id
        assert _feature_points(a) == _feature_points(b), f"map feature {a.id} differs"
        which = a.WhichOneof("feature_data")
        if which in ("lane", "road_line", "road_edge"):
            assert getattr(a, which).type == getattr(b, which).type
        if which == "lane":
            assert a.lane.speed_limit_mph == b.lane.speed_limit_mph
    assert len(back.dynamic_map_states) == len(original.dynamic_map_states)
    for a, b in zip(original.dynamic_map_states, back.dynamic_map_states):
        assert _lane_states(a) == _lane_states(b)


def test_parquet_arrays_identical(womd_record, tmp_path):
    shard = write_shard(tmp_path / "one.parquet", [womd_record, womd_record])
    records = list(read_shard(shard))
    assert len(records) == 2
    for name, value in vars(womd_record).items():
        got = getattr(records[1], name)
        if isinstance(value, np.ndarray):
            assert got.dtype == value.dtype, name
            np.testing.assert_array_equal(got, value, err_msg=name)
        else:
            assert got == value, name


def test_validate_rejects_bad_shapes(womd_record):
    with pytest.raises(ValueError, match="has 90 steps"):
        womd_record.replace(timestamps=womd_record.timestamps[:90], heading=womd_record.heading[:, :90],
                            xyz=womd_record.xyz[:, :90], velocity=womd_record.velocity[:, :90],
                            size=womd_record.size[:, :90], valid=womd_record.valid[:, :90],
                            tl_state=womd_record.tl_state[:90]).validate()
    xyz = womd_record.xyz.copy()
    xyz[3, 20, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite xyz"):
        womd_record.replace(xyz=xyz).validate()
