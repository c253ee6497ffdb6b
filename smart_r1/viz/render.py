"""Render a scenario and one of its rollouts to a PNG (a still) or an animated GIF.

    map            lanes thin grey, road edges black, road lines dashed, crosswalks hatched,
                   speed bumps and driveways as light polygons, stop signs as red octagons
    traffic lights a dot at each controlled lane's stop point, coloured by its state
    agents         oriented boxes coloured by type (vehicle, pedestrian, cyclist, other); the sim
                   agents (valid at the current step), the only ones a rollout moves
    trajectories   logged history (thin), logged future (dashed), simulated future (solid)
    events         boxes with a red edge while colliding, magenta while off-road; in the still,
                   crosses where those events happen along the simulated futures

The still shows the current step (10) with the whole futures drawn; the GIF plays the logged
history, then the rollout (or the log when no rollout is given). Everything that has many
elements is one collection (LineCollection, PolyCollection, scatter), so a frame costs a few
artist updates, not one artist per agent.

Shapes: A agents, S sim agents, R rollouts, T = 91 steps.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import animation  # noqa: E402
from matplotlib.collections import LineCollection, PolyCollection  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from smart_r1.metrics.rollouts_io import check_states  # noqa: E402
from smart_r1.metrics.signals import StepEvents  # noqa: E402
from smart_r1.types import (  # noqa: E402
    CROSSWALK, CYCLIST, DRIVEWAY, LANE, PEDESTRIAN, ROAD_EDGE, ROAD_LINE, SPEED_BUMP, STOP_SIGN,
    VEHICLE, ScenarioRecord,
)

TYPE_COLORS = {VEHICLE: "#1f77b4", PEDESTRIAN: "#ff7f0e", CYCLIST: "#2ca02c"}
OTHER_COLOR = "#7f7f7f"
COLLISION_COLOR = "#e31a1c"
OFFROAD_COLOR = "#ff00ff"
STOP_SIGN_COLOR = "#7a0000"
# TrafficSignalLaneState.State -> colour: 1 ARROW_STOP, 4 STOP, 7 FLASHING_STOP red; 2, 5, 8
# (caution) yellow; 3, 6 (go) green; 0 unknown grey. -1 (absent at this step) is not drawn.
_TL_COLORS = np.array(["#9e9e9e", "#d62728", "#ffbf00", "#2ca02c",
                       "#d62728", "#ffbf00", "#2ca02c", "#d62728", "#ffbf00"])
_MARGIN_M = 15.0
_MIN_VIEW_M = 60.0


def traffic_light_colors(states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For lane states int [L] at one step: (bool [L] drawn, str [L] colours)."""
    drawn = (states >= 0) & (states < len(_TL_COLORS))
    return drawn, _TL_COLORS[np.clip(states, 0, len(_TL_COLORS) - 1)]


def _agent_colors(object_type: np.ndarray) -> list[str]:
    return [TYPE_COLORS.get(int(t), OTHER_COLOR) for t in object_type]


def box_corners(x, y, heading, length, width) -> np.ndarray:
    """float [..., 4, 2]: corners of oriented boxes; inputs broadcast to a common shape [...]."""
    x, y, heading, length, width = np.broadcast_arrays(x, y, heading, length, width)
    c, s = np.cos(heading)[..., None], np.sin(heading)[..., None]
    dx = length[..., None] * np.array([0.5, -0.5, -0.5, 0.5])  # [..., 4] in the box frame
    dy = width[..., None] * np.array([0.5, 0.5, -0.5, -0.5])
    return np.stack([x[..., None] + c * dx - s * dy, y[..., None] + s * dx + c * dy], axis=-1)


def _view_box(record: ScenarioRecord) -> tuple[float, float, float]:
    """(centre x, centre y, half side) of a square around the sim agents' logged motion."""
    mask = record.sim_agent_mask
    xy = record.xyz[mask, record.current_time_index:, :2][record.valid[mask, record.current_time_index:]]
    if len(xy) == 0:
        xy = record.map_points[:, :2] if len(record.map_points) else np.zeros((1, 2))
    lo, hi = xy.min(0), xy.max(0)
    centre = (lo + hi) / 2
    half = max((hi - lo).max() / 2 + _MARGIN_M, _MIN_VIEW_M / 2)
    return float(centre[0]), float(centre[1]), float(half)


def draw_map(ax, record: ScenarioRecord) -> None:
    """Add the static map to `ax`: a handful of collections, whatever the number of features."""
    lines: dict[int, list[np.ndarray]] = {}
    for m, kind in enumerate(record.map_kind.tolist()):
        points = record.map_polyline(m)[:, :2]
        if len(points):
            lines.setdefault(kind, []).append(points)
    if LANE in lines:
        ax.add_collection(LineCollection(lines[LANE], colors="#c8c8c8", linewidths=0.6, zorder=1))
    if ROAD_LINE in lines:
        ax.add_collection(LineCollection(lines[ROAD_LINE], colors="#8c8c8c", linewidths=0.8,
                                         linestyles=(0, (4, 3)), zorder=2))
    if ROAD_EDGE in lines:
        ax.add_collection(LineCollection(lines[ROAD_EDGE], colors="black", linewidths=1.2, zorder=2))
    for kind, face in ((SPEED_BUMP, "#f3d9a4"), (DRIVEWAY, "#e6e6e6")):
        polys = [p for p in lines.get(kind, []) if len(p) >= 3]
        if polys:
            ax.add_collection(PolyCollection(polys, facecolors=face, edgecolors="none", zorder=0))
    crosswalks = [p for p in lines.get(CROSSWALK, []) if len(p) >= 3]
    if crosswalks:
        ax.add_collection(PolyCollection(crosswalks, facecolors="none", edgecolors="#9a9a9a",
                                         hatch="////", linewidths=0.5, zorder=1))
    if STOP_SIGN in lines:
        stops = np.concatenate(lines[STOP_SIGN])
        ax.scatter(stops[:, 0], stops[:, 1], marker="8", s=60, c=STOP_SIGN_COLOR, edgecolors="white",
                   linewidths=1.0, zorder=4)


def _full_trajectories(record: ScenarioRecord, states: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The sim agents' states over all 91 steps: logged up to now, then simulated.

    Returns (float [S, T, 4] x, y, z, heading; bool [S, T] valid). Without `states` the log is
    replayed, with its own validity.
    """
    mask, t0 = record.sim_agent_mask, record.current_time_index
    full = np.concatenate([record.xyz[mask], record.heading[mask, :, None]], axis=-1)
    valid = record.valid[mask].copy()
    if states is not None:
        full[:, t0 + 1:] = states
        valid[:, t0 + 1:] = True
    return full, valid


def _legend(ax) -> None:
    handles = [Patch(color=c, label=n) for n, c in
               (("vehicle", TYPE_COLORS[VEHICLE]), ("pedestrian", TYPE_COLORS[PEDESTRIAN]),
                ("cyclist", TYPE_COLORS[CYCLIST]))]
    handles += [Line2D([], [], color="k", ls="--", lw=1, label="logged future"),
                Line2D([], [], color="k", lw=1.5, label="simulated"),
                Patch(facecolor="none", edgecolor=COLLISION_COLOR, lw=2, label="collision"),
                Patch(facecolor="none", edgecolor=OFFROAD_COLOR, lw=2, label="off-road"),
                Line2D([], [], ls="", marker="o", mfc=_TL_COLORS[4], mec="k", label="light: stop"),
                Line2D([], [], ls="", marker="o", mfc=_TL_COLORS[6], mec="k", label="light: go"),
                Line2D([], [], ls="", marker="8", mfc=STOP_SIGN_COLOR, mec="w", label="stop sign")]
    ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.85)


class _Scene:
    """The figure and the collections that change from step to step."""

    def __init__(self, record: ScenarioRecord, states: np.ndarray | None,
                 events: StepEvents | None, title: str, figsize: float, dpi: int):
        self.record = record
        self.full, self.valid = _full_trajectories(record, states)
        self.events = events
        self.simulated = states is not None
        mask = record.sim_agent_mask
        self.size = record.size[mask]  # [S, T, 3]; simulated steps use the current step's box
        self.size = np.where(np.arange(self.size.shape[1])[None, :, None] > record.current_time_index,
                             self.size[:, record.current_time_index:record.current_time_index + 1], self.size)
        self.colors = np.array(_agent_colors(record.object_type[mask]))
        self.title = title

        self.fig, self.ax = plt.subplots(figsize=(figsize, figsize), dpi=dpi)
        cx, cy, half = _view_box(record)
        self.ax.set_xlim(cx - half, cx + half)
        self.ax.set_ylim(cy - half, cy + half)
        self.ax.set_aspect("equal")
        self.ax.set_facecolor("white")
        self.ax.tick_params(labelsize=7)
        draw_map(self.ax, record)
        self._draw_logged_lines()
        self.boxes = PolyCollection([], zorder=6, linewidths=0.6)
        self.ax.add_collection(self.boxes)
        self.lights = self.ax.scatter([], [], s=30, zorder=5, edgecolors="black", linewidths=0.4)
        _legend(self.ax)

    def _draw_logged_lines(self) -> None:
        record, t0 = self.record, self.record.current_time_index
        mask = record.sim_agent_mask
        xy, valid = record.xyz[mask, :, :2], record.valid[mask]
        history = [xy[s, :t0 + 1][valid[s, :t0 + 1]] for s in range(len(xy))]
        future = [xy[s, t0:][valid[s, t0:]] for s in range(len(xy))]
        self.ax.add_collection(LineCollection(history, colors=self.colors, linewidths=0.8,
                                              alpha=0.5, zorder=3))
        self.ax.add_collection(LineCollection(future, colors=self.colors, linewidths=1.0,
                                              linestyles=(0, (3, 2)), alpha=0.6, zorder=3))

    def draw_simulated_lines(self, upto: int | None = None) -> LineCollection:
        """The simulated futures (from the current step) up to step `upto` (default: the end)."""
        t0 = self.record.current_time_index
        end = self.full.shape[1] if upto is None else upto + 1
        segments = [self.full[s, t0:max(end, t0 + 1), :2] for s in range(len(self.full))]
        lines = LineCollection(segments, colors=self.colors, linewidths=1.6, zorder=4)
        self.ax.add_collection(lines)
        return lines

    def draw_event_marks(self) -> None:
        """Crosses where the still's rollout collides (red) or leaves the road (magenta)."""
        sim = self.full[:, self.record.current_time_index + 1:, :2]  # [S, 80, 2]
        for flags, color in ((self.events.offroad, OFFROAD_COLOR), (self.events.collision, COLLISION_COLOR)):
            points = sim[flags]
            if len(points):
                self.ax.scatter(points[:, 0], points[:, 1], marker="x", s=12, linewidths=0.8,
                                c=color, zorder=7)

    def show_step(self, t: int) -> None:
        """Boxes and traffic lights at step t (0..90)."""
        present = self.valid[:, t]
        x, y, _, heading = self.full[present, t].T
        size = self.size[present, t]
        corners = box_corners(x, y, heading, size[:, 0], size[:, 1])
        edges = np.full(present.sum(), "black", dtype=object)
        widths = np.full(present.sum(), 0.6)
        k = t - self.record.current_time_index - 1
        if self.events is not None and k >= 0:
            off, hit = self.events.offroad[present, k], self.events.collision[present, k]
            edges[off], widths[off] = OFFROAD_COLOR, 2.0
            edges[hit], widths[hit] = COLLISION_COLOR, 2.0  # a collision outranks off-road
        self.boxes.set_verts(list(corners))
        self.boxes.set_facecolor(self.colors[present])
        self.boxes.set_edgecolor(list(edges))
        self.boxes.set_linewidth(widths)
        self.boxes.set_alpha(0.85)

        drawn, colors = traffic_light_colors(self.record.tl_state[t])
        self.lights.set_offsets(self.record.tl_stop_point[drawn, :2].reshape(-1, 2))
        self.lights.set_facecolor(colors[drawn])
        phase = "logged" if t <= self.record.current_time_index or not self.simulated else "simulated"
        self.ax.set_title(f"{self.title}  t={t / 10 - 1:+.1f} s ({phase})", fontsize=9)


def render_scenario(record: ScenarioRecord, states: np.ndarray | None = None,
                    out_path: str | Path = "scenario.png", rollout_index: int = 0, *,
                    events: StepEvents | None = None, figsize: float = 8.0, dpi: int = 100,
                    frame_stride: int = 2, fps: int = 10) -> Path:
    """Draw `record` and rollout `rollout_index` of `states` to `out_path` (.png or .gif).

    states: float [R, S, 80, 4] (x, y, z, heading of the sim agents, `record.sim_agent_ids`
        order) or None to show the log. events: that rollout's collision / off-road flags per
        step (`smart_r1.metrics.step_events`), drawn when given. frame_stride: steps between GIF
        frames (2 -> 46 frames at `fps` per second). Returns the written path.
    """
    out_path = Path(out_path)
    suffix = out_path.suffix.lower()
    if suffix not in (".png", ".gif"):
        raise ValueError(f"render output must end in .png or .gif, got {out_path.name!r}")
    if frame_stride < 1:
        raise ValueError(f"frame_stride must be at least 1, got {frame_stride}")
    rollout = None
    if states is not None:
        states = check_states(record, states)
        if not 0 <= rollout_index < states.shape[0]:
            raise ValueError(f"rollout index {rollout_index} out of range: there are {states.shape[0]} rollouts")
        rollout = states[rollout_index]  # [S, 80, 4]
    if events is not None and (rollout is None or events.collision.shape != rollout.shape[:2]):
        raise ValueError("events must be the flags [S, 80] of the drawn rollout")
    title = f"{record.scenario_id}" + (f" rollout {rollout_index}" if rollout is not None else " log")
    scene = _Scene(record, rollout, events, title, figsize, dpi)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.partial{suffix}")  # renamed into place once whole
    try:
        if suffix == ".png":
            if rollout is not None:
                scene.draw_simulated_lines()
                scene.draw_event_marks()
            scene.show_step(record.current_time_index)
            scene.fig.savefig(tmp, bbox_inches="tight")
        else:
            lines = scene.draw_simulated_lines(upto=record.current_time_index) if rollout is not None else None
            steps = list(range(0, record.num_steps, frame_stride))
            if steps[-1] != record.num_steps - 1:
                steps.append(record.num_steps - 1)

            def frame(t: int):
                scene.show_step(t)
                if lines is not None:
                    t0 = record.current_time_index
                    lines.set_segments([scene.full[s, t0:max(t, t0) + 1, :2] for s in range(len(scene.full))])
                return []

            anim = animation.FuncAnimation(scene.fig, frame, frames=steps, blit=False)
            anim.save(tmp, writer=animation.PillowWriter(fps=fps))
        tmp.replace(out_path)
    finally:
        plt.close(scene.fig)
        tmp.unlink(missing_ok=True)
    return out_path
