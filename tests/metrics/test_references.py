"""Model-free references on the real scenario: log replay has minADE 0 and travels as the log does,
a stationary simulation travels nothing and moves less like the log (kinematic), yet scores a
realism of its own."""

from __future__ import annotations

import pytest

from smart_r1.metrics.references import reference_scores, summary


def test_reference_policies_on_the_real_scenario(womd_record):
    scores = reference_scores([womd_record])
    assert list(scores) == ["log replay", "stationary", "constant velocity"]
    log, still = summary(scores["log replay"]), summary(scores["stationary"])
    assert log["min_average_displacement_error"] == pytest.approx(0.0, abs=1e-6) and log["travel_ratio"] == 1.0
    assert still["travel_ratio"] == 0.0 and still["min_average_displacement_error"] > 1.0
    # realism alone does not order them: on this scene standing still (0.68) outscores the log (0.61)
    assert 0.0 < still["metametric"] < 1.0 and 0.0 < log["metametric"] < 1.0
    assert still["kinematic_metrics"] < log["kinematic_metrics"]
    assert summary(scores["constant velocity"])["travel_ratio"] > 0.5
