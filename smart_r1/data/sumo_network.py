"""SUMO road networks: build one with `netgenerate`, then read it as WOMD map features.

A `RoadMap` holds every map feature of one network (lanes, road lines, road edges, crosswalks)
and the traffic-light programme of every signal-controlled lane, ready to be cropped around a
scenario's self-driving car. Road edges are the boundary of the drivable surface, found by
rasterising the surface (vehicle lanes, junction interiors without their sidewalk corners) and
tracing its outline, so that junction interiors, where traffic legitimately drives, hold no edge.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import contourpy
import numpy as np
import sumo
import sumolib
from PIL import Image, ImageDraw
from scipy import ndimage

from smart_r1.types import CROSSWALK, LANE, ROAD_EDGE, ROAD_LINE

# WOMD enums used here (map.proto).
LANE_SURFACE_STREET, LANE_BIKE = 2, 3
LINE_BROKEN_SINGLE_WHITE, LINE_SOLID_DOUBLE_YELLOW = 1, 7
EDGE_BOUNDARY = 1
TL_UNKNOWN, TL_STOP, TL_CAUTION, TL_GO = 0, 4, 5, 6
MPS_TO_MPH = 2.2369363

# SUMO link state letter -> (how permissive, WOMD lane state). A lane with several links shows its
# most permissive one: a vehicle may leave the lane whenever any of its movements is allowed.
_LINK_STATE = {
    "G": (3, TL_GO), "g": (3, TL_GO), "s": (1, TL_STOP), "y": (2, TL_CAUTION), "Y": (2, TL_CAUTION),
    "u": (2, TL_CAUTION), "r": (1, TL_STOP), "R": (1, TL_STOP), "o": (0, TL_UNKNOWN), "O": (0, TL_UNKNOWN),
}


@dataclass(frozen=True)
class NetworkSpec:
    """One netgenerate network: `kind` is "grid" or "random"."""

    kind: str
    lanes: int  # lanes per direction, 1..3
    speed: float  # m/s speed limit
    block: float  # grid block length or random-net mean edge length, metres
    size: int  # grid junctions per side, or random-net growth iterations
    seed: int


def sumo_env() -> dict[str, str]:
    """Environment for SUMO tools: SUMO_HOME pointing at the PyPI package."""
    return {**os.environ, "SUMO_HOME": sumo.SUMO_HOME}


def run_tool(args: list[str]) -> None:
    """Run a SUMO binary; on failure raise with the end of its error output."""
    done = subprocess.run(args, env=sumo_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} failed ({done.returncode}): {done.stderr[-2000:]}")


def build_network(spec: NetworkSpec, workdir: Path) -> Path:
    """Run netgenerate; every junction gets a traffic light, every road sidewalks and crossings."""
    out = workdir / "net.net.xml"
    args = [
        sumolib.checkBinary("netgenerate"), "--seed", str(spec.seed), "-o", str(out),
        "--default.lanenumber", str(spec.lanes), "--default.speed", f"{spec.speed:.2f}",
        "--default-junction-type", "traffic_light", "--tls.default-type", "static",
        "--sidewalks.guess", "--sidewalks.guess.max-speed", "40", "--crossings.guess",
        "--no-turnarounds", "true", "--junctions.corner-detail", "5", "--no-warnings",
    ]
    if spec.kind == "grid":
        args += ["--grid", "--grid.number", str(spec.size), "--grid.length", f"{spec.block:.1f}",
                 "--grid.attach-length", f"{spec.block * 0.6:.1f}"]
    elif spec.kind == "random":
        args += ["--rand", "--rand.iterations", str(spec.size), "--rand.bidi-probability", "1",
                 "--rand.min-distance", f"{spec.block * 0.7:.1f}",
                 "--rand.max-distance", f"{spec.block * 1.4:.1f}", "--rand.min-angle", "60",
                 "--rand.neighbor-dist5", "0", "--rand.neighbor-dist6", "0"]
    else:
        raise ValueError(f"unknown network kind {spec.kind!r}")
    run_tool(args)
    return out


@dataclass(frozen=True)
class RoadMap:
    """All map features of one network, and its traffic-light states over the simulation.

    Fields (F features, P points, L signal-controlled lanes, S simulation steps):
        feature_id: int64 [F]
        kind: int8 [F], LANE / ROAD_LINE / ROAD_EDGE / CROSSWALK
        subtype: int8 [F], LaneType / RoadLineType / RoadEdgeType (0 for crosswalks)
        speed_limit: float32 [F], mph for lanes, 0 else
        offsets: int64 [F + 1], feature f owns points[offsets[f]:offsets[f+1]]
        points: float64 [P, 3]
        group: int64 [F], features of one group are kept or cropped together (a road-edge ring
            split into pieces must stay whole, or the signed distance to it flips sign)
        tl_feature: int64 [L], index into the feature axis of each controlled lane
        tl_stop_point: float64 [L, 3], the lane's end, where vehicles wait
        tl_state: int8 [S, L], WOMD TrafficSignalLaneState.State per simulation step
    """

    feature_id: np.ndarray
    kind: np.ndarray
    subtype: np.ndarray
    speed_limit: np.ndarray
    offsets: np.ndarray
    points: np.ndarray
    group: np.ndarray
    tl_feature: np.ndarray
    tl_stop_point: np.ndarray
    tl_state: np.ndarray
    lane_feature: dict  # SUMO lane id -> feature index, for vehicle lanes


class _Features:
    """Accumulates map features in order."""

    def __init__(self) -> None:
        self.kind, self.subtype, self.speed, self.group, self.polylines = [], [], [], [], []

    def add(self, kind: int, subtype: int, points: np.ndarray, speed: float = 0.0,
            group: int | None = None) -> int:
        self.kind.append(kind)
        self.subtype.append(subtype)
        self.speed.append(speed)
        self.group.append(len(self.group) if group is None else group)
        self.polylines.append(np.asarray(points, dtype=np.float64)[:, :2])
        return len(self.kind) - 1


def densify(points: np.ndarray, spacing: float) -> np.ndarray:
    """float64 [n, 2] -> [m, 2]: insert points so that no segment is longer than `spacing`."""
    points = np.asarray(points, dtype=np.float64)[:, :2]
    seg = np.diff(points, axis=0)  # [n-1, 2]
    pieces = np.maximum(np.ceil(np.linalg.norm(seg, axis=1) / spacing), 1).astype(int)
    frac = np.concatenate([np.arange(k) / k for k in pieces])  # position inside each segment
    start = np.repeat(np.arange(len(seg)), pieces)
    return np.vstack([points[start] + seg[start] * frac[:, None], points[-1:]])


def offset_polyline(points: np.ndarray, distance: float) -> np.ndarray:
    """float64 [n, 2]: the polyline shifted `distance` metres to its left (mitred vertex normals)."""
    points = np.asarray(points, dtype=np.float64)[:, :2]
    seg = np.diff(points, axis=0)
    seg /= np.maximum(np.linalg.norm(seg, axis=1, keepdims=True), 1e-9)
    normal = np.stack([-seg[:, 1], seg[:, 0]], axis=1)  # left of each segment
    vertex = np.vstack([normal[:1], normal[:-1] + normal[1:], normal[-1:]])
    vertex /= np.maximum(np.linalg.norm(vertex, axis=1, keepdims=True), 1e-9)
    # Mitre: scale so the offset stays `distance` from both neighbouring segments.
    cos_half = np.einsum("ij,ij->i", vertex, np.vstack([normal, normal[-1:]]))
    return points + vertex * (distance / np.clip(cos_half, 0.5, 1.0))[:, None]


def _is_vehicle_lane(lane) -> bool:
    return lane.allows("passenger") or lane.allows("bicycle") or lane.allows("bus")


def extract_map(net_path: Path, num_steps: int, step_seconds: float,
                raster_resolution: float = 0.2) -> RoadMap:
    """Read a SUMO network as WOMD map features plus per-step traffic-light states."""
    net = sumolib.net.readNet(str(net_path), withInternal=True, withPedestrianConnections=True,
                              withPrograms=True)
    features = _Features()
    lane_feature: dict[str, int] = {}
    edges = sorted(net.getEdges(withInternal=True), key=lambda e: e.getID())
    for edge in edges:
        function = edge.getFunction()
        if function in ("", "internal"):
            vehicle_lanes = [lane for lane in edge.getLanes() if _is_vehicle_lane(lane)]
            for lane in vehicle_lanes:
                subtype = LANE_SURFACE_STREET if lane.allows("passenger") else LANE_BIKE
                lane_feature[lane.getID()] = features.add(
                    LANE, subtype, densify(np.array(lane.getShape()), 1.0),
                    speed=lane.getSpeed() * MPS_TO_MPH)
            if function == "":
                _add_road_lines(features, edge, vehicle_lanes)
        elif function == "crossing":
            lane = edge.getLanes()[0]
            centre = np.array(lane.getShape())
            half = lane.getWidth() / 2
            right, left = offset_polyline(centre, -half), offset_polyline(centre, half)
            features.add(CROSSWALK, 0, np.vstack([right, left[::-1]]))
    surface, lanes, origin = _rasterise_drivable(net, raster_resolution)
    for ring in _trace_road_edges(surface, lanes, origin, raster_resolution):
        group = len(features.group)
        for piece in _split_ring(ring):
            features.add(ROAD_EDGE, EDGE_BOUNDARY, piece, group=group)

    tl_feature, tl_stop, tl_state = _traffic_lights(net, lane_feature, num_steps, step_seconds)
    offsets = np.cumsum([0] + [len(p) for p in features.polylines])
    points2 = np.vstack(features.polylines)
    return RoadMap(
        feature_id=np.arange(1, len(features.kind) + 1, dtype=np.int64),
        kind=np.array(features.kind, dtype=np.int8),
        subtype=np.array(features.subtype, dtype=np.int8),
        speed_limit=np.array(features.speed, dtype=np.float32),
        offsets=offsets.astype(np.int64),
        points=np.hstack([points2, np.zeros((len(points2), 1))]),
        group=np.array(features.group, dtype=np.int64),
        tl_feature=tl_feature, tl_stop_point=tl_stop, tl_state=tl_state,
        lane_feature=lane_feature,
    )


def _add_road_lines(features: _Features, edge, vehicle_lanes: list) -> None:
    """Broken white lines between neighbouring lanes of one edge; a double yellow centre line
    on the left of a two-way road (drawn once, by the edge whose id sorts first)."""
    for right, left in zip(vehicle_lanes[:-1], vehicle_lanes[1:]):
        line = offset_polyline(np.array(right.getShape()), right.getWidth() / 2)
        features.add(ROAD_LINE, LINE_BROKEN_SINGLE_WHITE, densify(line, 2.0))
    if not vehicle_lanes:
        return
    reverse = [e for e in edge.getToNode().getOutgoing() if e.getToNode() == edge.getFromNode()]
    if reverse and edge.getID() < reverse[0].getID():
        leftmost = vehicle_lanes[-1]
        line = offset_polyline(np.array(leftmost.getShape()), leftmost.getWidth() / 2)
        features.add(ROAD_LINE, LINE_SOLID_DOUBLE_YELLOW, densify(line, 2.0))


def _rasterise_drivable(net, res: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 [H, W] images of the drivable surface and of the vehicle lanes alone (1 inside) at
    `res` metres per pixel, and the world position of pixel (0, 0)'s corner: pixel [r, c] covers
    x in origin.x + [c, c+1) * res, y likewise with r."""
    (xmin, ymin), (xmax, ymax) = net.getBBoxXY()
    origin = np.array([xmin - 20.0, ymin - 20.0])
    size = (int(np.ceil((xmax - xmin + 40.0) / res)), int(np.ceil((ymax - ymin + 40.0) / res)))
    surface, lanes = Image.new("L", size, 0), Image.new("L", size, 0)
    draw, draw_lanes = ImageDraw.Draw(surface), ImageDraw.Draw(lanes)

    def pix(points) -> list[tuple[float, float]]:
        return [tuple(p) for p in ((np.asarray(points)[:, :2] - origin) / res).tolist()]

    edges = net.getEdges(withInternal=True)
    # Junction interiors are drivable except their sidewalk corners (walking areas), which are
    # cut out again below; dead ends have no interior, only the sidewalk's end.
    for node in net.getNodes():
        if node.getType() != "dead_end" and len(node.getShape()) >= 3:
            draw.polygon(pix(node.getShape()), fill=1)
    for edge in edges:
        if edge.getFunction() == "walkingarea":
            draw.polygon(pix(edge.getLanes()[0].getShape()), fill=0)
    for edge in edges:
        if edge.getFunction() not in ("", "internal"):
            continue
        for lane in edge.getLanes():
            if not _is_vehicle_lane(lane):
                continue
            centre = _extend_dead_ends(np.array(lane.getShape()), edge)
            half = lane.getWidth() / 2
            # Polygons, not wide lines: PIL's wide lines wobble by a pixel on slanted roads.
            # PIL fills a polygon's boundary pixels too, so neighbouring lanes leave no seam.
            outline = pix(np.vstack([offset_polyline(centre, half), offset_polyline(centre, -half)[::-1]]))
            draw.polygon(outline, fill=1)
            draw_lanes.polygon(outline, fill=1)
    return np.asarray(surface, dtype=np.uint8), np.asarray(lanes, dtype=np.uint8), origin


def _extend_dead_ends(shape: np.ndarray, edge, metres: float = 3.0) -> np.ndarray:
    """Vehicles enter and leave the network at dead ends: let the road run on past them, so that
    the network's rim is not drawn as a road edge right where they appear."""
    if edge.getFunction() != "":
        return shape
    if edge.getFromNode().getType() == "dead_end":
        d = shape[0] - shape[1]
        shape = np.vstack([shape[0] + d / max(np.linalg.norm(d), 1e-9) * metres, shape])
    if edge.getToNode().getType() == "dead_end":
        d = shape[-1] - shape[-2]
        shape = np.vstack([shape, shape[-1] + d / max(np.linalg.norm(d), 1e-9) * metres])
    return shape


def _clean_surface(surface: np.ndarray, lanes: np.ndarray, res: float,
                   min_hole: float = 30.0) -> np.ndarray:
    """float32 [H, W]: the drivable surface without slivers or pinholes, lightly blurred.
    Junction outlines and walking areas do not match exactly: the difference leaves thin strips
    of "road" beyond the curb, whose own outlines would face the wrong way. Only surface
    connected to a vehicle lane is kept."""
    disk = np.hypot(*np.mgrid[-2:3, -2:3]) <= 2.0  # ~0.8 m across at 0.2 m per pixel
    solid = ndimage.binary_opening(surface.astype(bool), structure=disk) | lanes.astype(bool)
    labels, _ = ndimage.label(solid)
    solid = np.isin(labels, np.unique(labels[lanes.astype(bool)]))
    holes, count = ndimage.label(~solid)
    area = ndimage.sum_labels(np.ones_like(holes), holes, np.arange(1, count + 1)) * res**2
    solid[np.isin(holes, np.flatnonzero(area < min_hole) + 1)] = True
    # A 3x3 blur turns pixel staircases into a smooth 0.5 level on slanted boundaries.
    return ndimage.uniform_filter(solid.astype(np.float32), size=3)


def _trace_road_edges(surface: np.ndarray, lanes: np.ndarray, origin: np.ndarray,
                      res: float) -> list[np.ndarray]:
    """Closed outlines of the drivable surface, oriented with the road on their left (port)
    side, as the official off-road metric requires: outer rims counterclockwise, holes
    (blocks between roads) clockwise."""
    smooth = _clean_surface(surface, lanes, res)
    padded = np.pad(smooth, 1)  # a zero border closes every outline
    generator = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
    rings = []
    for line in generator.lines(0.5):
        if len(line) < 4:
            continue
        # Array element [r, c] sits at (c, r) for contourpy; pixel centres are at +0.5.
        world = origin + (line - 1.0 + 0.5) * res
        world = _simplify(world, tolerance=0.25 * res)
        if len(world) < 4:
            continue
        if not _road_on_left(world, smooth > 0.5, origin, res):
            world = world[::-1]
        rings.append(world)
    return rings


def _road_on_left(ring: np.ndarray, surface: np.ndarray, origin: np.ndarray, res: float) -> bool:
    """Sample the surface just left of every segment's midpoint; majority vote."""
    seg = np.diff(ring, axis=0)
    length = np.maximum(np.linalg.norm(seg, axis=1, keepdims=True), 1e-9)
    left = np.stack([-seg[:, 1], seg[:, 0]], axis=1) / length
    probe = (ring[:-1] + seg / 2 + left * 1.5 * res - origin) / res
    col = np.clip(probe[:, 0].astype(int), 0, surface.shape[1] - 1)
    row = np.clip(probe[:, 1].astype(int), 0, surface.shape[0] - 1)
    weights = length[:, 0]
    return float(np.sum(weights * surface[row, col])) > 0.5 * float(np.sum(weights))


def _simplify(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Ramer-Douglas-Peucker on an open or closed polyline (endpoints kept)."""
    keep = np.zeros(len(points), dtype=bool)
    keep[[0, -1]] = True
    stack = [(0, len(points) - 1)]
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        chord = points[b] - points[a]
        rel = points[a + 1:b] - points[a]
        norm = np.linalg.norm(chord)
        if norm < 1e-9:
            dist = np.linalg.norm(rel, axis=1)
        else:
            dist = np.abs(chord[0] * rel[:, 1] - chord[1] * rel[:, 0]) / norm
        i = int(np.argmax(dist))
        if dist[i] > tolerance:
            keep[a + 1 + i] = True
            stack += [(a, a + 1 + i), (a + 1 + i, b)]
    return points[keep]


def _turn(ring: np.ndarray) -> np.ndarray:
    """float64 [n-1]: absolute turning angle at each vertex of a closed ring (first == last)."""
    seg = np.diff(ring, axis=0)
    ang = np.arctan2(seg[:, 1], seg[:, 0])
    return np.abs((ang - np.roll(ang, 1) + np.pi) % (2 * np.pi) - np.pi)


def _split_ring(ring: np.ndarray, max_points: int = 20, spacing: float = 4.0) -> list[np.ndarray]:
    """Cut a closed ring into open pieces of at most `max_points` points. The official evaluator
    pads every polyline to the longest one, so long rings would make it slow; cuts fall on
    straight stretches, where an open end cannot flip the sign of the distance to the edge."""
    ring = densify(ring, spacing)
    if len(ring) <= max_points:
        return [ring]
    turn = _turn(ring)
    start = int(np.argmin(turn))  # begin at the straightest vertex
    ring = np.vstack([ring[start:-1], ring[:start + 1]])
    turn = np.roll(turn, -start)
    pieces, a = [], 0
    last = len(ring) - 1
    while last - a >= max_points:
        lo, hi = a + max_points // 2, a + max_points - 1
        b = lo + int(np.argmin(turn[lo:hi + 1]))
        pieces.append(ring[a:b + 1])
        a = b
    pieces.append(ring[a:])
    return pieces


def _traffic_lights(net, lane_feature: dict[str, int], num_steps: int,
                    step_seconds: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-step WOMD state of every vehicle lane that enters a signalised junction, from the
    static signal programmes (the state a vehicle at the lane's end sees)."""
    features, stops, columns = [], [], []
    times = np.arange(num_steps) * step_seconds
    for tls in sorted(net.getTrafficLights(), key=lambda t: t.getID()):
        programs = tls.getPrograms()
        if not programs:
            continue
        program = programs[sorted(programs)[0]]
        if float(program.getOffset() or 0) != 0.0:
            raise ValueError(f"traffic light {tls.getID()}: programmes with an offset are not supported")
        phases = program.getPhases()
        durations = np.array([float(p.duration) for p in phases])
        ends = np.cumsum(durations)
        # Phase active at each step (the programme starts with phase 0 at time 0 and repeats).
        phase_at = np.searchsorted(ends, times % ends[-1], side="right")
        links: dict[str, list[int]] = {}
        for in_lane, _out_lane, link in tls.getConnections():
            if in_lane.getID() in lane_feature and in_lane.getEdge().getFunction() == "":
                links.setdefault(in_lane.getID(), []).append(int(link))
        for lane_id in sorted(links):
            per_phase = []
            for phase in phases:
                best = max(_LINK_STATE.get(phase.state[i], (0, TL_UNKNOWN)) for i in links[lane_id])
                per_phase.append(best[1])
            columns.append(np.array(per_phase, dtype=np.int8)[phase_at])
            features.append(lane_feature[lane_id])
            end = net.getLane(lane_id).getShape()[-1]
            stops.append((end[0], end[1], 0.0))
    state = np.stack(columns, axis=1) if columns else np.zeros((num_steps, 0), dtype=np.int8)
    return (np.array(features, dtype=np.int64), np.array(stops, dtype=np.float64).reshape(-1, 3),
            state)
