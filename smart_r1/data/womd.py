"""WOMD `Scenario` protos <-> `ScenarioRecord` arrays.

Kept: every field that training, metrics and export use (tracks, sdc, tracks_to_predict,
objects_of_interest, map feature geometry with id/kind/subtype and lane speed limits, traffic-light
states with stop points). Not kept: lane connectivity (entry/exit lanes, neighbours, boundaries),
stop-sign lane lists, lane `interpolating` flags and lidar/camera data.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError
from waymo_open_dataset.protos import map_pb2, scenario_pb2

from smart_r1.data.tfrecord import RecordError, read_records, write_records
from smart_r1.types import (
    CROSSWALK, DRIVEWAY, LANE, MAP_KIND_ID, MAP_KINDS, NUM_STEPS, ROAD_EDGE, ROAD_LINE, SPEED_BUMP, STOP_SIGN,
    TL_ABSENT, ScenarioRecord,
)

# Where each kind keeps its points, and whether it has a `type` enum.
_POINTS_FIELD = {
    LANE: "polyline", ROAD_LINE: "polyline", ROAD_EDGE: "polyline", CROSSWALK: "polygon",
    SPEED_BUMP: "polygon", DRIVEWAY: "polygon", STOP_SIGN: None,
}
_HAS_TYPE = {LANE, ROAD_LINE, ROAD_EDGE}


def _points(points) -> list[tuple[float, float, float]]:
    return [(p.x, p.y, p.z) for p in points]


def scenario_from_proto(scenario: scenario_pb2.Scenario) -> ScenarioRecord:
    """Convert a Scenario proto to arrays (not validated: call `.validate()`)."""
    tracks = scenario.tracks
    num_steps = len(scenario.timestamps_seconds)
    num_agents = len(tracks)
    for i, track in enumerate(tracks):
        if len(track.states) != num_steps:
            raise ValueError(
                f"scenario {scenario.scenario_id}: track {track.id} has {len(track.states)} states, "
                f"the scenario has {num_steps} timestamps"
            )
    states = [(s.center_x, s.center_y, s.center_z, s.heading, s.velocity_x, s.velocity_y,
               s.length, s.width, s.height, s.valid) for t in tracks for s in t.states]
    table = np.array(states, dtype=np.float64).reshape(num_agents, num_steps, 10)

    map_id, map_kind, map_subtype, speed, offsets, points = [], [], [], [], [0], []
    for feature in scenario.map_features:
        which = feature.WhichOneof("feature_data")
        if which is None:
            continue
        kind = MAP_KIND_ID[which]
        data = getattr(feature, which)
        if kind == STOP_SIGN:
            pts = _points([data.position])
        else:
            pts = _points(getattr(data, _POINTS_FIELD[kind]))
        map_id.append(feature.id)
        map_kind.append(kind)
        map_subtype.append(data.type if kind in _HAS_TYPE else 0)
        speed.append(data.speed_limit_mph if kind == LANE else 0.0)
        points.extend(pts)
        offsets.append(len(points))

    lane_ids: dict[int, int] = {}
    stop_points: list[tuple[float, float, float]] = []
    for dyn in scenario.dynamic_map_states:
        for ls in dyn.lane_states:
            if ls.lane not in lane_ids:
                lane_ids[ls.lane] = len(lane_ids)
                stop_points.append((ls.stop_point.x, ls.stop_point.y, ls.stop_point.z))
    tl_state = np.full((num_steps, len(lane_ids)), TL_ABSENT, dtype=np.int8)
    for t, dyn in enumerate(scenario.dynamic_map_states[:num_steps]):
        for ls in dyn.lane_states:
            tl_state[t, lane_ids[ls.lane]] = ls.state

    return ScenarioRecord(
        scenario_id=scenario.scenario_id,
        timestamps=np.asarray(scenario.timestamps_seconds, dtype=np.float64),
        current_time_index=int(scenario.current_time_index),
        sdc_index=int(scenario.sdc_track_index),
        object_id=np.array([t.id for t in tracks], dtype=np.int64),
        object_type=np.array([t.object_type for t in tracks], dtype=np.int8),
        xyz=table[..., 0:3].copy(),
        heading=table[..., 3].astype(np.float32),
        velocity=table[..., 4:6].astype(np.float32),
        size=table[..., 6:9].astype(np.float32),
        valid=table[..., 9].astype(bool),
        tracks_to_predict=np.array([r.track_index for r in scenario.tracks_to_predict], dtype=np.int32),
        difficulty=np.array([r.difficulty for r in scenario.tracks_to_predict], dtype=np.int8),
        objects_of_interest=np.array(scenario.objects_of_interest, dtype=np.int64),
        map_id=np.array(map_id, dtype=np.int64),
        map_kind=np.array(map_kind, dtype=np.int8),
        map_subtype=np.array(map_subtype, dtype=np.int8),
        map_speed_limit=np.array(speed, dtype=np.float64),
        map_offsets=np.array(offsets, dtype=np.int64),
        map_points=np.array(points, dtype=np.float64).reshape(-1, 3),
        tl_lane_id=np.array(list(lane_ids), dtype=np.int64),
        tl_state=tl_state,
        tl_stop_point=np.array(stop_points, dtype=np.float64).reshape(-1, 3),
    )


def _set_points(field, points: np.ndarray) -> None:
    for x, y, z in points.tolist():
        field.add(x=x, y=y, z=z)


def scenario_to_proto(record: ScenarioRecord) -> scenario_pb2.Scenario:
    """Convert arrays back to a Scenario proto (the fields listed in the module docstring)."""
    s = scenario_pb2.Scenario(
        scenario_id=record.scenario_id,
        current_time_index=record.current_time_index,
        sdc_track_index=record.sdc_index,
    )
    s.timestamps_seconds.extend(record.timestamps.tolist())
    xyz, heading, vel, size, valid = (record.xyz.tolist(), record.heading.tolist(),
                                      record.velocity.tolist(), record.size.tolist(), record.valid.tolist())
    for a in range(record.num_agents):
        track = s.tracks.add(id=int(record.object_id[a]), object_type=int(record.object_type[a]))
        for t in range(record.num_steps):
            (x, y, z), (vx, vy), (length, width, height) = xyz[a][t], vel[a][t], size[a][t]
            track.states.add(center_x=x, center_y=y, center_z=z, length=length, width=width,
                             height=height, heading=heading[a][t], velocity_x=vx, velocity_y=vy,
                             valid=valid[a][t])
    for m in range(record.map_id.shape[0]):
        kind = int(record.map_kind[m])
        feature = s.map_features.add(id=int(record.map_id[m]))
        data = getattr(feature, MAP_KINDS[kind - 1])
        pts = record.map_polyline(m)
        if kind == STOP_SIGN:
            if len(pts):
                data.position.CopyFrom(map_pb2.MapPoint(x=pts[0, 0], y=pts[0, 1], z=pts[0, 2]))
            else:
                data.SetInParent()
        else:
            data.SetInParent()
            _set_points(getattr(data, _POINTS_FIELD[kind]), pts)
        if kind in _HAS_TYPE:
            data.type = int(record.map_subtype[m])
        if kind == LANE:
            data.speed_limit_mph = float(record.map_speed_limit[m])
    for t in range(record.num_steps):
        dyn = s.dynamic_map_states.add()
        for l in np.flatnonzero(record.tl_state[t] != TL_ABSENT):
            x, y, z = record.tl_stop_point[l].tolist()
            dyn.lane_states.add(lane=int(record.tl_lane_id[l]), state=int(record.tl_state[t, l]),
                                stop_point=map_pb2.MapPoint(x=x, y=y, z=z))
    for idx, diff in zip(record.tracks_to_predict.tolist(), record.difficulty.tolist()):
        s.tracks_to_predict.add(track_index=idx, difficulty=diff)
    s.objects_of_interest.extend(record.objects_of_interest.tolist())
    return s


def _decode(data: bytes, path: str | Path, index: int) -> scenario_pb2.Scenario:
    """The Scenario proto of one record; RecordError when the bytes are not one."""
    try:
        proto = scenario_pb2.Scenario.FromString(data)
    except DecodeError as e:
        raise RecordError(path, index, f"not a Scenario proto ({e})") from None
    if not isinstance(proto.scenario_id, str):  # proto2 hands a string that is not UTF-8 back as bytes
        raise RecordError(path, index, f"scenario_id {proto.scenario_id[:40]!r} is not UTF-8")
    return proto


def parse_scenario(data: bytes, path: str | Path = "<bytes>", index: int = 0) -> ScenarioRecord:
    """Parse and validate one serialized Scenario; errors (RecordError) name the file and record index."""
    proto = _decode(data, path, index)
    # Checked before the arrays are built: traffic-light states take steps x lanes bytes, which a
    # corrupt step count could make huge.
    if len(proto.timestamps_seconds) != NUM_STEPS:
        raise RecordError(path, index, f"scenario {proto.scenario_id}: has {len(proto.timestamps_seconds)} "
                                       f"steps, WOMD scenarios have {NUM_STEPS}")
    try:
        return scenario_from_proto(proto).validate()
    except ValueError as e:
        raise RecordError(path, index, str(e)) from None


def read_scenarios(path: str | Path) -> Iterator[ScenarioRecord]:
    """Yield every scenario of a TFRecord file; raise RecordError at the first bad record."""
    for index, data in enumerate(read_records(path)):
        yield parse_scenario(data, path, index)


def read_scenario_protos(path: str | Path) -> Iterator[scenario_pb2.Scenario]:
    """Yield every Scenario proto of a TFRecord file, as stored; RecordError at the first bad record."""
    for index, data in enumerate(read_records(path)):
        yield _decode(data, path, index)


def write_scenarios(path: str | Path, records) -> int:
    """Write records (ScenarioRecord or Scenario protos) to a TFRecord file."""
    def payloads():
        for r in records:
            proto = r if isinstance(r, scenario_pb2.Scenario) else scenario_to_proto(r)
            yield proto.SerializeToString()
    return write_records(path, payloads())
