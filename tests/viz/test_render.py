"""Renders of the real WOMD scenario with the official test submission's rollouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smart_r1.metrics import step_events
from smart_r1.viz.render import box_corners


@pytest.fixture(scope="module")
def test_submission_path() -> Path:
    from waymo_open_dataset.protos import scenario_pb2

    package = Path(scenario_pb2.__file__).resolve().parents[1]
    return package / "utils" / "sim_agents" / "testdata" / "test_submission.binproto"


@pytest.fixture(scope="module")
def states(womd_record, test_submission_path):
    from smart_r1.evaluation.submission import read_rollouts
    from smart_r1.metrics.rollouts_io import scenario_rollouts_to_states

    (rollouts,) = read_rollouts(test_submission_path)
    return scenario_rollouts_to_states(womd_record, rollouts)  # [32, S, 80, 4]


def _pixels_near(image: np.ndarray, hex_color: str, tol: int = 40) -> int:
    rgb = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(image[..., :3].astype(int) - rgb).max(-1) < tol).sum())


def test_png_of_rollout_is_a_real_picture(womd_record, states, tmp_path):
    from smart_r1.viz.render import COLLISION_COLOR, OFFROAD_COLOR, TYPE_COLORS, render_scenario
    from smart_r1.types import VEHICLE

    path = render_scenario(womd_record, states, tmp_path / "scene.png", rollout_index=3,
                           events=step_events(womd_record, states[3]))
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[0] > 500 and image.shape[1] > 500
    colors = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colors) > 200, "a map, agents and trajectories give many distinct colours"
    white = (image > 245).all(-1).mean()
    assert 0.2 < white < 0.97, f"{white:.2f} of the image is white"
    # Vehicles are drawn, and the constant-velocity rollouts do collide and leave the road.
    assert _pixels_near(image, TYPE_COLORS[VEHICLE]) > 500
    assert _pixels_near(image, COLLISION_COLOR) > 20
    assert _pixels_near(image, OFFROAD_COLOR) > 20


def test_log_still_has_no_event_marks(womd_record, tmp_path):
    from smart_r1.viz.render import COLLISION_COLOR, OFFROAD_COLOR, render_scenario

    image = np.asarray(Image.open(render_scenario(womd_record, None, tmp_path / "log.png")).convert("RGB"))
    # The legend's two small swatches only (a few hundred pixels at most); no crosses along paths.
    assert _pixels_near(image, OFFROAD_COLOR, tol=10) < 150
    assert _pixels_near(image, COLLISION_COLOR, tol=10) < 150


def test_gif_has_frames_that_change(womd_record, states, tmp_path):
    from smart_r1.viz.render import render_scenario

    path = render_scenario(womd_record, states, tmp_path / "scene.gif", frame_stride=15, dpi=50,
                           events=step_events(womd_record, states[0]))
    gif = Image.open(path)
    assert gif.n_frames >= 7  # steps 0, 15, ..., 90
    frames = []
    for i in (0, gif.n_frames - 1):
        gif.seek(i)
        frames.append(np.asarray(gif.convert("RGB"), dtype=int))
    assert np.abs(frames[0] - frames[1]).sum(-1).astype(bool).mean() > 0.01


def test_render_rejects_bad_requests(womd_record, states, tmp_path):
    from smart_r1.viz.render import render_scenario

    with pytest.raises(ValueError, match="png or .gif"):
        render_scenario(womd_record, states, tmp_path / "scene.jpg")
    with pytest.raises(ValueError, match="out of range"):
        render_scenario(womd_record, states, tmp_path / "scene.png", rollout_index=32)
    with pytest.raises(ValueError, match="sim agents"):
        render_scenario(womd_record, states[:, 1:], tmp_path / "scene.png")


def test_box_corners_are_oriented():
    corners = box_corners(np.array([10.0]), np.array([5.0]), np.array([np.pi / 2]), 4.0, 2.0)
    # Heading north: the front-left corner is 2 m north and 1 m west of the centre.
    np.testing.assert_allclose(corners[0], [[9, 7], [9, 3], [11, 3], [11, 7]], atol=1e-9)


def test_step_events_agree_with_the_metrics_signals(womd_record, states):
    from smart_r1.metrics import rollout_signals

    events = step_events(womd_record, states[3])
    assert events.collision.shape == events.offroad.shape == states.shape[1:3]
    signals = rollout_signals(womd_record, states[3:4])
    # The RL signals count events at log-valid steps only: each of theirs is one of ours.
    for ours, theirs in ((events.collision, signals.collision), (events.offroad, signals.offroad)):
        theirs = theirs[0].numpy()
        assert theirs.any()
        assert not (theirs & ~ours.any(axis=1)).any()


def test_cli_render_and_its_errors(womd_path, test_submission_path, tmp_path, capsys):
    from smart_r1.cli import main

    out = tmp_path / "cli.png"
    assert main(["render", "--scenario", str(womd_path), "--rollouts", str(test_submission_path),
                 "--out", str(out)]) == 0
    assert out.stat().st_size > 20_000
    # A file that holds no rollouts, and an index past the 32 rollouts: a message, exit code 2.
    assert main(["render", "--scenario", str(womd_path), "--rollouts", str(womd_path),
                 "--out", str(out)]) == 2
    assert "neither a SimAgentsChallengeSubmission nor a ScenarioRollouts" in capsys.readouterr().err
    assert main(["render", "--scenario", str(womd_path), "--rollouts", str(test_submission_path),
                 "--out", str(out), "--rollout-index", "99"]) == 2
    assert "out of range" in capsys.readouterr().err
