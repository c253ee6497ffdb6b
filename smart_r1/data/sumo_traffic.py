"""SUMO traffic: randomTrips demand, one headless `sumo` run at 0.1 s, FCD output as arrays.

Every agent type has an explicit vType whose size is SUMO's default for its vehicle class, so the
logged boxes are exactly the ones SUMO kept apart (minGap) and drove along the lanes.
"""

from __future__ import annotations

import contextlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import sumo
import sumolib

from smart_r1.data.sumo_network import run_tool
from smart_r1.types import CYCLIST, PEDESTRIAN, VEHICLE


@dataclass(frozen=True)
class AgentType:
    """A SUMO vType with its WOMD object type; sizes are SUMO's vClass defaults (metres)."""

    name: str
    vclass: str
    object_type: int
    length: float
    width: float
    height: float
    share: float  # probability inside its demand stream (vehicles: car / truck / bus)


AGENT_TYPES = (
    AgentType("car", "passenger", VEHICLE, 5.0, 1.8, 1.5, 0.86),
    AgentType("truck", "truck", VEHICLE, 7.1, 2.4, 2.4, 0.09),
    AgentType("bus", "bus", VEHICLE, 12.0, 2.5, 3.4, 0.05),
    AgentType("bike", "bicycle", CYCLIST, 1.6, 0.65, 1.7, 1.0),
    AgentType("ped", "pedestrian", PEDESTRIAN, 0.215, 0.478, 1.719, 1.0),
)
TYPE_INDEX = {t.name: i for i, t in enumerate(AGENT_TYPES)}


@dataclass(frozen=True)
class Demand:
    """Mean seconds between departures of each stream (randomTrips --period), and sim length."""

    vehicle_period: float
    bike_period: float
    pedestrian_period: float
    seconds: float  # departures happen during [0, seconds)


@dataclass(frozen=True)
class Tracks:
    """FCD of one simulation, densely on the step grid.

    Fields (N agents, S steps):
        agent_type: int8 [N], index into AGENT_TYPES
        xy: float64 [N, S, 2], box centre
        heading: float32 [N, S], radians counterclockwise from +x
        speed: float32 [N, S], m/s
        valid: bool [N, S]
    """

    agent_type: np.ndarray
    xy: np.ndarray
    heading: np.ndarray
    speed: np.ndarray
    valid: np.ndarray


def write_vtypes(path: Path) -> None:
    vehicles = [t for t in AGENT_TYPES if t.object_type == VEHICLE]
    lines = ["<additional>", '  <vTypeDistribution id="vehicles">']
    for t in vehicles:
        lines.append(f'    <vType id="{t.name}" vClass="{t.vclass}" length="{t.length}" width="{t.width}" '
                     f'height="{t.height}" probability="{t.share}"/>')
    lines.append("  </vTypeDistribution>")
    for t in AGENT_TYPES:
        if t.object_type != VEHICLE:
            # Cyclists keep right, but 0.7 m right of the lane centre rather than flush with the
            # curb (SUMO's "right"), where their box would graze the road edge.
            align = ' latAlignment="-0.7"' if t.object_type == CYCLIST else ""
            lines.append(f'  <vType id="{t.name}" vClass="{t.vclass}"{align} length="{t.length}" '
                         f'width="{t.width}" height="{t.height}"/>')
    lines.append("</additional>")
    path.write_text("\n".join(lines) + "\n")


def _random_trips(args: list[str]) -> None:
    """Run SUMO's randomTrips.py in this process (saves an interpreter start per call)."""
    tools = str(Path(sumo.SUMO_HOME) / "tools")
    if tools not in sys.path:
        sys.path.append(tools)
    import randomTrips  # noqa: PLC0415  (SUMO's tool, importable only once tools/ is on the path)

    with contextlib.redirect_stdout(io.StringIO()):
        randomTrips.main(randomTrips.get_options(args))


def make_demand(net: Path, workdir: Path, demand: Demand, seed: int) -> list[Path]:
    """Trips for vehicles (car/truck/bus mix), bicycles and pedestrians; returns route files.
    Vehicles start and end mostly at the fringe (through traffic), as in a city centre."""
    vtypes = workdir / "types.add.xml"
    write_vtypes(vtypes)
    streams = [
        ("veh", demand.vehicle_period, ["--fringe-factor", "5", "--vclass", "passenger",
                                        "--trip-attributes", 'type="vehicles" departLane="best" departSpeed="max"']),
        ("bike", demand.bike_period, ["--vclass", "bicycle",
                                      "--trip-attributes", 'type="bike" departSpeed="max"']),
        ("ped", demand.pedestrian_period, ["--pedestrians", "--trip-attributes", 'type="ped"']),
    ]
    routes = []
    for i, (prefix, period, extra) in enumerate(streams):
        trips = workdir / f"{prefix}.trips.xml"
        # No duarouter validation pass: every trip of these connected networks is routable, and
        # sumo routes trips itself at insertion (--ignore-route-errors would skip a bad one).
        _random_trips(["-n", str(net), "-o", str(trips), "--no-validate", "--seed", str(seed * 10 + i),
                       "--prefix", prefix, "-b", "0", "-e", f"{demand.seconds:.1f}", "-p", f"{period:.3f}",
                       "--min-distance", "150", "--additional-files", str(vtypes)] + extra)
        routes.append(trips)
    return [vtypes] + routes


def simulate(net: Path, files: list[Path], workdir: Path, seconds: float, step: float,
             seed: int) -> Tracks:
    """Run sumo headless for `seconds` at `step` and read its FCD output."""
    additional, routes = files[0], files[1:]
    # Parquet FCD: SUMO writes it several times faster than XML or CSV, and it loads in columns.
    fcd = workdir / "fcd.parquet"
    args = [
        sumolib.checkBinary("sumo"), "-n", str(net), "-a", str(additional),
        "-r", ",".join(str(r) for r in routes), "--step-length", f"{step}", "--begin", "0",
        "--end", f"{seconds:.1f}", "--seed", str(seed), "--fcd-output", str(fcd),
        "--fcd-output.attributes", "x,y,angle,type,speed",
        # Sublane model: lane changes are continuous lateral motion (not a 3.2 m jump in one step)
        # and vehicles keep lateral gaps to their neighbours while doing them. The simpler
        # --lanechange.duration lets a slow, yawed bus sweep into the next lane's traffic.
        "--lateral-resolution", "0.8", "--no-step-log", "--no-warnings", "--duration-log.disable",
        "--time-to-teleport", "-1", "--ignore-route-errors",
    ]
    run_tool(args)
    return read_fcd(fcd, round(seconds / step) + 1, step)


def read_fcd(path: Path, num_steps: int, step: float) -> Tracks:
    """Parse SUMO's Parquet FCD (one row per agent and step) into dense [N, S] arrays."""
    frame = pq.read_table(path).to_pandas()
    frame.columns = [c.split("_", 1)[-1] for c in frame.columns]  # "vehicle_x" -> "x"
    agent, ids = pd.factorize(frame["id"], sort=True)
    steps = np.rint(frame["time"].to_numpy(float) / step).astype(int)
    type_of = frame.groupby(agent, sort=True)["type"].first()
    agent_type = np.array([TYPE_INDEX[t] for t in type_of.to_numpy(str)], dtype=np.int8)

    n = len(ids)
    valid = np.zeros((n, num_steps), dtype=bool)
    xy = np.zeros((n, num_steps, 2))
    heading = np.zeros((n, num_steps), dtype=np.float32)
    speed = np.zeros((n, num_steps), dtype=np.float32)
    keep = steps < num_steps
    agent, steps = agent[keep], steps[keep]
    # SUMO angle: degrees clockwise from north; WOMD heading: radians counterclockwise from +x.
    yaw = np.deg2rad(90.0 - frame["angle"].to_numpy(float)[keep])
    yaw = (yaw + np.pi) % (2 * np.pi) - np.pi
    front = np.stack([frame["x"].to_numpy(float)[keep], frame["y"].to_numpy(float)[keep]], axis=1)
    length = np.array([t.length for t in AGENT_TYPES])[agent_type[agent]]
    # SUMO reports an agent's front (bumper); WOMD boxes are centred.
    centre = front - 0.5 * length[:, None] * np.stack([np.cos(yaw), np.sin(yaw)], axis=1)
    valid[agent, steps] = True
    xy[agent, steps] = centre
    heading[agent, steps] = yaw
    speed[agent, steps] = frame["speed"].to_numpy(float)[keep]
    return Tracks(agent_type=agent_type, xy=xy, heading=heading, speed=speed, valid=valid)
