"""The embedded default dataset: WOMD `Scenario` TFRecords made with Eclipse SUMO.

For each network (netgenerate grid or random, 1 to 3 lanes, signalised junctions, sidewalks and
crossings) one SUMO simulation at 0.1 s is run with randomTrips demand (cars, trucks, buses,
bicycles, pedestrians), and many 9.1 s scenarios are cut from it: windows every few seconds, and
in each window several self-driving cars far enough apart to see different traffic. A scenario
keeps the agents near its self-driving car and the map around it, and is written through the
same `ScenarioRecord` -> proto path as WOMD data, so `smart-r1 preprocess` reads both alike.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from waymo_open_dataset.protos import map_pb2, scenario_pb2

from smart_r1.data.sumo_network import NetworkSpec, RoadMap, build_network, extract_map
from smart_r1.data.sumo_traffic import AGENT_TYPES, Demand, Tracks, make_demand, simulate
from smart_r1.data.tfrecord import write_records
from smart_r1.data.womd import scenario_to_proto
from smart_r1.storage import write_json
from smart_r1.types import (
    CURRENT_TIME_INDEX, CYCLIST, MAP_KINDS, NUM_STEPS, PEDESTRIAN, STEP_SECONDS, TL_ABSENT, VEHICLE,
    ScenarioRecord,
)


@dataclass(frozen=True)
class SumoConfig:
    """How networks, traffic and scenario windows are drawn. The defaults cost about 0.08
    CPU-seconds per scenario (about 25 scenarios/s on two idle cores)."""

    warmup_seconds: float = 40.0  # let the network fill before the first window
    record_seconds: float = 90.0  # simulated time that windows are cut from
    window_stride_seconds: float = 2.0  # start of one window to the next
    sdcs_per_window: int = 4  # self-driving cars per window, each its own scenario
    sdc_separation: float = 60.0  # metres between the sdcs of one window (at the current step)
    agent_radius: float = 50.0  # agents that come this close to the sdc's current position
    map_radius: float = 100.0  # map features within this distance of it (8 s at 45 km/h)
    signal_radius: float = 80.0  # traffic-light states of lanes whose stop line is this close
    min_sdc_travel: float = 10.0  # metres: the sdc must drive, not wait at a light all window
    max_tracks_to_predict: int = 8  # WOMD's limit
    predict_min_future_fraction: float = 0.8  # valid on at least this share of future steps
    moving_travel: float = 2.0  # metres over the window above which an agent counts as moving
    workers: int = 2  # networks simulated in parallel


def network_spec(seed: int, index: int, seconds: float) -> tuple[NetworkSpec, Demand]:
    """The network of network `index` for dataset `seed`, and its demand over `seconds` of
    simulation (deterministic)."""
    rng = np.random.default_rng([seed, index])
    kind = "grid" if index % 2 == 0 else "random"
    lanes = int(rng.integers(1, 4))
    speed = float(rng.choice([11.11, 13.89, 16.67]))
    block = float(rng.uniform(80.0, 140.0))
    size = int(rng.integers(3, 6)) if kind == "grid" else int(rng.integers(25, 45))
    spec = NetworkSpec(kind=kind, lanes=lanes, speed=speed, block=block, size=size,
                       seed=int(rng.integers(1, 2**31 - 1)))
    demand = Demand(
        vehicle_period=float(rng.uniform(0.8, 1.6)) * (2.0 / (lanes + 1)),
        bike_period=float(rng.uniform(6.0, 14.0)),
        pedestrian_period=float(rng.uniform(1.5, 4.0)),
        seconds=seconds,
    )
    return spec, demand


def simulate_network(seed: int, index: int, config: SumoConfig) -> tuple[RoadMap, Tracks]:
    """Build network `index`, run its traffic, return the map and the FCD tracks."""
    seconds = config.warmup_seconds + config.record_seconds
    spec, demand = network_spec(seed, index, seconds)
    with tempfile.TemporaryDirectory(prefix="smart_r1_sumo_") as tmp:
        work = Path(tmp)
        net = build_network(spec, work)
        files = make_demand(net, work, demand, spec.seed)
        tracks = simulate(net, files, work, seconds, STEP_SECONDS, spec.seed)
        road = extract_map(net, tracks.valid.shape[1], STEP_SECONDS)
    return road, tracks


def network_scenarios(seed: int, index: int, config: SumoConfig) -> list[bytes]:
    """All scenarios cut from network `index`, serialized, in a fixed order."""
    road, tracks = simulate_network(seed, index, config)
    rng = np.random.default_rng([seed, index, 1])
    object_type = np.array([t.object_type for t in AGENT_TYPES], dtype=np.int8)[tracks.agent_type]
    size = np.array([[t.length, t.width, t.height] for t in AGENT_TYPES], dtype=np.float32)
    size = size[tracks.agent_type]  # [N, 3]
    is_car = tracks.agent_type == 0
    first = round(config.warmup_seconds / STEP_SECONDS)
    stride = round(config.window_stride_seconds / STEP_SECONDS)
    serialize = MapSplicer(road)
    out = []
    for start in range(first, tracks.valid.shape[1] - NUM_STEPS + 1, stride):
        window = slice(start, start + NUM_STEPS)
        valid = tracks.valid[:, window]
        xy = tracks.xy[:, window]
        travel = np.linalg.norm(xy[:, -1] - xy[:, 0], axis=-1)
        candidates = np.flatnonzero(is_car & valid.all(axis=1) & (travel >= config.min_sdc_travel))
        chosen: list[int] = []
        for sdc in rng.permutation(candidates):
            here = xy[sdc, CURRENT_TIME_INDEX]
            if all(np.linalg.norm(here - xy[c, CURRENT_TIME_INDEX]) >= config.sdc_separation
                   for c in chosen):
                chosen.append(int(sdc))
            if len(chosen) == config.sdcs_per_window:
                break
        for k, sdc in enumerate(sorted(chosen)):
            record = cut_scenario(road, tracks, object_type, size, start, sdc, rng, config,
                                  scenario_id=f"sumo-{seed}-{index:04d}-{start:05d}-{k}")
            if record is not None:
                out.append(serialize(record.validate()))
    return out


def cut_scenario(road: RoadMap, tracks: Tracks, object_type: np.ndarray, size: np.ndarray,
                 start: int, sdc: int, rng: np.random.Generator, config: SumoConfig,
                 scenario_id: str) -> ScenarioRecord | None:
    """One scenario: the window of 91 steps from `start`, seen from agent `sdc`."""
    window = slice(start, start + NUM_STEPS)
    centre = tracks.xy[sdc, start + CURRENT_TIME_INDEX]
    valid = tracks.valid[:, window]
    dist = np.linalg.norm(tracks.xy[:, window] - centre, axis=-1)
    near = (np.where(valid, dist, np.inf) <= config.agent_radius).any(axis=1)
    # Agents present now that leave the network before the window ends are left out: WOSAC needs
    # every sim agent at all 80 future steps, and whatever fills the steps after it has gone puts
    # a box where no agent is (a ghost that following traffic would drive through).
    near &= ~(valid[:, CURRENT_TIME_INDEX] & ~valid[:, -1])
    near = np.flatnonzero(near)
    agents = np.concatenate([[sdc], near[near != sdc]])  # the sdc is agent 0
    valid = valid[agents]
    xy = np.where(valid[..., None], tracks.xy[agents, window], 0.0)
    heading = np.where(valid, tracks.heading[agents, window], 0.0).astype(np.float32)
    speed = np.where(valid, tracks.speed[agents, window], 0.0)
    velocity = (speed[..., None] * np.stack([np.cos(heading), np.sin(heading)], -1)).astype(np.float32)
    box = np.where(valid[..., None], size[agents][:, None, :], 0.0).astype(np.float32)  # [A, T, 3]
    z = box[..., 2:3] / 2  # box centres stand on the flat (z = 0) road
    predict = choose_tracks_to_predict(valid, xy, object_type[agents], rng, config)
    if len(predict) == 0:
        return None
    map_rows = crop_map(road, centre, config.map_radius)
    kept = np.zeros(len(road.kind), dtype=bool)
    kept[map_rows] = True
    stop_dist = np.linalg.norm(road.tl_stop_point[:, :2] - centre, axis=1)
    lights = np.flatnonzero(kept[road.tl_feature] & (stop_dist <= config.signal_radius))
    offsets = road.offsets
    points = np.concatenate([road.points[offsets[m]:offsets[m + 1]] for m in map_rows])
    lengths = offsets[map_rows + 1] - offsets[map_rows]
    return ScenarioRecord(
        scenario_id=scenario_id,
        timestamps=np.arange(NUM_STEPS, dtype=np.float64) * STEP_SECONDS,
        current_time_index=CURRENT_TIME_INDEX,
        sdc_index=0,
        object_id=(agents + 1).astype(np.int64),
        object_type=object_type[agents],
        xyz=np.concatenate([xy, z], axis=-1).astype(np.float64),
        heading=heading,
        velocity=velocity,
        size=box,
        valid=valid,
        tracks_to_predict=predict.astype(np.int32),
        difficulty=np.ones(len(predict), dtype=np.int8),
        objects_of_interest=np.zeros(0, dtype=np.int64),
        map_id=road.feature_id[map_rows],
        map_kind=road.kind[map_rows],
        map_subtype=road.subtype[map_rows],
        map_speed_limit=road.speed_limit[map_rows].astype(np.float64),
        map_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        map_points=points,
        tl_lane_id=road.feature_id[road.tl_feature[lights]],
        tl_state=road.tl_state[window][:, lights],
        tl_stop_point=road.tl_stop_point[lights],
    )


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field: key varint, length varint, payload."""
    out = bytearray()
    for value in ((number << 3) | 2, len(payload)):
        while value > 0x7F:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out) + payload


SUMMARY_NAME = "dataset.json"  # written last: a generated set with it is complete
_SCENARIO = scenario_pb2.Scenario.DESCRIPTOR
_TRACKS = _SCENARIO.fields_by_name["tracks"].number
_MAP_FEATURES = _SCENARIO.fields_by_name["map_features"].number
_DYNAMIC_MAP_STATES = _SCENARIO.fields_by_name["dynamic_map_states"].number
_LANE_STATES = _SCENARIO.fields_by_name["dynamic_map_states"].message_type.fields_by_name["lane_states"].number


class MapSplicer:
    """Serializes scenarios of one network fast: tracks are encoded with numpy, and each map
    feature and each (lane, signal state) is serialized once per network and spliced in as
    bytes. Protobuf parses concatenated fields as one message, so the bytes read back exactly as
    `scenario_to_proto(record)` (a test checks it); the map is most of a scenario's size."""

    def __init__(self, road: RoadMap):
        everything = scenario_to_proto(map_only_record(road))
        self.feature = {int(f.id): _field(_MAP_FEATURES, f.SerializeToString())
                        for f in everything.map_features}
        self.lane_state: dict[tuple[int, int], bytes] = {}

    def _lane_state(self, lane: int, state: int, stop: np.ndarray) -> bytes:
        key = (lane, state)
        if key not in self.lane_state:
            x, y, z = stop.tolist()
            message = map_pb2.TrafficSignalLaneState(lane=lane, state=state,
                                                     stop_point=map_pb2.MapPoint(x=x, y=y, z=z))
            self.lane_state[key] = _field(_LANE_STATES, message.SerializeToString())
        return self.lane_state[key]

    def __call__(self, record: ScenarioRecord) -> bytes:
        header = record.replace(  # everything but tracks, map and signals
            object_id=record.object_id[:0], object_type=record.object_type[:0], xyz=record.xyz[:0],
            heading=record.heading[:0], velocity=record.velocity[:0], size=record.size[:0],
            valid=record.valid[:0], map_id=record.map_id[:0], map_kind=record.map_kind[:0],
            map_subtype=record.map_subtype[:0], map_speed_limit=record.map_speed_limit[:0],
            map_offsets=record.map_offsets[:1], map_points=record.map_points[:0],
            tl_lane_id=record.tl_lane_id[:0], tl_state=record.tl_state[:, :0],
            tl_stop_point=record.tl_stop_point[:0])
        proto = scenario_to_proto(header)
        proto.ClearField("dynamic_map_states")
        parts = [proto.SerializeToString(), encode_tracks(record)]
        parts += [self.feature[m] for m in record.map_id.tolist()]
        lanes, states = record.tl_lane_id.tolist(), record.tl_state.tolist()
        for t in range(record.num_steps):
            step = b"".join(self._lane_state(lane, state, record.tl_stop_point[l])
                            for l, (lane, state) in enumerate(zip(lanes, states[t]))
                            if state != TL_ABSENT)
            parts.append(_field(_DYNAMIC_MAP_STATES, step))
        return b"".join(parts)


# One `Track.states` entry as WOMD's proto2 wire format lays it out: the key byte of each field,
# then its little-endian value (doubles for the centre, floats for the rest, a varint bool).
_STATE_ENTRY = np.dtype([
    ("key", "u1"), ("size", "u1"),
    ("kx", "u1"), ("x", "<f8"), ("ky", "u1"), ("y", "<f8"), ("kz", "u1"), ("z", "<f8"),
    ("kl", "u1"), ("length", "<f4"), ("kw", "u1"), ("width", "<f4"), ("kh", "u1"), ("height", "<f4"),
    ("ka", "u1"), ("heading", "<f4"), ("kvx", "u1"), ("vx", "<f4"), ("kvy", "u1"), ("vy", "<f4"),
    ("kv", "u1"), ("valid", "u1"),
])
_STATE_KEYS = {"key": (3 << 3) | 2, "size": _STATE_ENTRY.itemsize - 2, "kx": (2 << 3) | 1,
               "ky": (3 << 3) | 1, "kz": (4 << 3) | 1, "kl": (5 << 3) | 5, "kw": (6 << 3) | 5,
               "kh": (7 << 3) | 5, "ka": (8 << 3) | 5, "kvx": (9 << 3) | 5, "kvy": (10 << 3) | 5,
               "kv": (11 << 3) | 0}


def _varint_field(number: int, value: int) -> bytes:
    out = bytearray([(number << 3) | 0])
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_tracks(record: ScenarioRecord) -> bytes:
    """The `Scenario.tracks` fields of a record, serialized with numpy instead of one proto call
    per state (ten times faster); same bytes as `scenario_to_proto(record)` writes."""
    entries = np.zeros(record.valid.shape, dtype=_STATE_ENTRY)  # [A, T]
    for name, key in _STATE_KEYS.items():
        entries[name] = key
    entries["x"], entries["y"], entries["z"] = (record.xyz[..., i] for i in range(3))
    entries["length"], entries["width"], entries["height"] = (record.size[..., i] for i in range(3))
    entries["heading"] = record.heading
    entries["vx"], entries["vy"] = record.velocity[..., 0], record.velocity[..., 1]
    entries["valid"] = record.valid
    tracks = []
    for a in range(record.num_agents):
        head = _varint_field(1, int(record.object_id[a])) + _varint_field(2, int(record.object_type[a]))
        tracks.append(_field(_TRACKS, head + entries[a].tobytes()))
    return b"".join(tracks)


def map_only_record(road: RoadMap) -> ScenarioRecord:
    """A record holding every map feature of the network and no agents (for `MapSplicer`)."""
    return ScenarioRecord(
        scenario_id="map", timestamps=np.arange(NUM_STEPS) * STEP_SECONDS,
        current_time_index=CURRENT_TIME_INDEX, sdc_index=0,
        object_id=np.zeros(0, np.int64), object_type=np.zeros(0, np.int8),
        xyz=np.zeros((0, NUM_STEPS, 3)), heading=np.zeros((0, NUM_STEPS), np.float32),
        velocity=np.zeros((0, NUM_STEPS, 2), np.float32), size=np.zeros((0, NUM_STEPS, 3), np.float32),
        valid=np.zeros((0, NUM_STEPS), bool), tracks_to_predict=np.zeros(0, np.int32),
        difficulty=np.zeros(0, np.int8), objects_of_interest=np.zeros(0, np.int64),
        map_id=road.feature_id, map_kind=road.kind, map_subtype=road.subtype,
        map_speed_limit=road.speed_limit.astype(np.float64), map_offsets=road.offsets,
        map_points=road.points, tl_lane_id=np.zeros(0, np.int64),
        tl_state=np.zeros((NUM_STEPS, 0), np.int8), tl_stop_point=np.zeros((0, 3)))


def choose_tracks_to_predict(valid: np.ndarray, xy: np.ndarray, object_type: np.ndarray,
                             rng: np.random.Generator, config: SumoConfig) -> np.ndarray:
    """Up to 8 agents as WOMD picks them: valid now and through most of the future, moving ones
    first (random order within each group); never the sdc (agent 0).

    Pedestrians are left out: they walk on sidewalks, which lie outside the road edges as in WOMD,
    and the official off-road rate counts every evaluated agent whatever its type.
    """
    future = valid[:, CURRENT_TIME_INDEX + 1:]
    ok = valid[:, CURRENT_TIME_INDEX] & (future.mean(axis=1) >= config.predict_min_future_fraction)
    ok &= object_type != PEDESTRIAN
    ok[0] = False
    steps = np.diff(xy, axis=1)
    both = valid[:, 1:] & valid[:, :-1]
    travel = np.where(both, np.linalg.norm(steps, axis=-1), 0.0).sum(axis=1)
    moving = np.flatnonzero(ok & (travel >= config.moving_travel))
    still = np.flatnonzero(ok & (travel < config.moving_travel))
    order = np.concatenate([rng.permutation(moving), rng.permutation(still)])
    return np.sort(order[: config.max_tracks_to_predict])


def crop_map(road: RoadMap, centre: np.ndarray, radius: float) -> np.ndarray:
    """int64 [M']: features with a point within `radius` of `centre`, plus every other piece of
    their group (a road-edge ring stays closed, so off-road signs stay right far from the sdc)."""
    d2 = np.sum((road.points[:, :2] - centre) ** 2, axis=1)
    nearest = np.minimum.reduceat(d2, road.offsets[:-1])
    groups = np.unique(road.group[nearest <= radius**2])
    return np.flatnonzero(np.isin(road.group, groups))


def _network_job(args: tuple[int, int, SumoConfig]) -> list[bytes]:
    return network_scenarios(*args)


def _interleave(per_network: list[list[bytes]], seed: int, first_index: int, per_network_max: int = 0) -> list[bytes]:
    """Scenarios of a batch of networks, alternating between the networks (so a small dataset
    still mixes grid and random networks), each network's in a seeded random order of windows,
    at most `per_network_max` of each (0: all)."""
    shuffled = []
    for i, scenarios in enumerate(per_network):
        order = np.random.default_rng([seed, first_index + i, 2]).permutation(len(scenarios))
        shuffled.append([scenarios[k] for k in order][:per_network_max or None])
    longest = max((len(s) for s in shuffled), default=0)
    return [s[k] for k in range(longest) for s in shuffled if k < len(s)]


def make_dataset(out_dir, num_scenarios: int, seed: int, scenarios_per_file: int = 50,
                 config: SumoConfig = SumoConfig(), per_network: int = 0) -> dict:
    """Generate `num_scenarios` scenarios into `out_dir/sumo-SSSSS-of-NNNNN.tfrecord` files.

    per_network: at most this many scenarios from each network (0: every window and self-driving
    car). An evaluation set takes 1: its scenarios are then independent units (windows of one
    network share its traffic), and an interval over them means what it says.

    Deterministic: the same seed gives the same bytes. Returns a JSON-able summary, also written
    last as `out_dir/dataset.json`: each file is written atomically and the summary after them,
    so a set with its summary is complete (an interrupted run leaves no summary; see
    `complete_dataset`).
    """
    if num_scenarios < 1 or scenarios_per_file < 1:
        raise ValueError("--scenarios and --per-file must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    scenarios: list[bytes] = []
    networks = 0
    workers = max(1, min(config.workers, os.cpu_count() or 1))
    # Spawned, not forked: the caller may have started threads (TensorFlow, torch, Ray) that a
    # forked child would inherit in an undefined state.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        while len(scenarios) < num_scenarios:
            # Networks are independent: run a batch of them side by side, keep index order.
            batch = [(seed, networks + i, config) for i in range(workers)]
            before = len(scenarios)
            scenarios.extend(_interleave(list(pool.map(_network_job, batch)), seed, networks, per_network))
            networks += workers
            if len(scenarios) == before and networks >= 10 * workers:
                raise RuntimeError(f"{networks} SUMO networks gave only {before} scenarios: "
                                   "no vehicle drove through a whole window (gridlock?)")
    scenarios = scenarios[:num_scenarios]
    num_files = -(-num_scenarios // scenarios_per_file)
    files = []
    for f in range(num_files):
        path = out_dir / f"sumo-{f:05d}-of-{num_files:05d}.tfrecord"
        write_records(path, scenarios[f * scenarios_per_file:(f + 1) * scenarios_per_file])
        files.append(str(path))
    seconds = time.perf_counter() - started
    summary = {"files": files, "scenarios": len(scenarios), "networks": networks, "seed": seed,
               "per_network": per_network,
               "scenarios_per_file": scenarios_per_file, "seconds": round(seconds, 3),
               "scenarios_per_second": round(len(scenarios) / seconds, 2),
               **summarize(scenarios), "config": asdict(config)}
    write_json(out_dir / SUMMARY_NAME, summary)
    return summary


def complete_dataset(out_dir, num_scenarios: int, seed: int, per_network: int = 0) -> bool:
    """Whether `out_dir` holds a whole generated set of these `num_scenarios`, `seed` and
    `per_network` (its summary is written after every file, and names them)."""
    path = Path(out_dir) / SUMMARY_NAME
    if not path.exists():
        return False
    summary = json.loads(path.read_text())
    return (summary.get("scenarios") == num_scenarios and summary.get("seed") == seed
            and summary.get("per_network", 0) == per_network
            and all((Path(out_dir) / Path(f).name).exists() for f in summary.get("files", [])))


def summarize(scenarios: list[bytes]) -> dict:
    """Agents per type, map features per kind and tracks_to_predict, counted over all scenarios."""
    agents, features, predicted, lights = Counter(), Counter(), 0, 0
    names = {VEHICLE: "vehicle", PEDESTRIAN: "pedestrian", CYCLIST: "cyclist"}
    for data in scenarios:
        s = scenario_pb2.Scenario.FromString(data)
        agents.update(names.get(t.object_type, "other") for t in s.tracks)
        features.update(f.WhichOneof("feature_data") for f in s.map_features)
        predicted += len(s.tracks_to_predict)
        lights += len(s.dynamic_map_states[CURRENT_TIME_INDEX].lane_states)
    n = max(len(scenarios), 1)
    return {"agents_per_type": dict(sorted(agents.items())),
            "map_features_per_kind": {k: features[k] for k in MAP_KINDS if features[k]},
            "mean_agents": round(sum(agents.values()) / n, 1),
            "mean_tracks_to_predict": round(predicted / n, 2),
            "mean_signalled_lanes": round(lights / n, 1)}
