"""Map segments: equal-length cuts of every polyline, geometry kept in the segment's own frame."""

from __future__ import annotations

import numpy as np

from smart_r1.tokens.geometry import compose
from smart_r1.tokens.map_tokens import POINTS_PER_SEGMENT, SEGMENT_LENGTH, map_segments
from smart_r1.types import LANE


def test_segments_of_the_shared_scenario(womd_record):
    rec = womd_record
    segs = map_segments(rec)
    lengths = segs.features[:, -1]
    assert lengths.max() <= SEGMENT_LENGTH + 1e-6
    feature_len = np.array([np.linalg.norm(np.diff(rec.map_polyline(m)[:, :2], axis=0), axis=1).sum()
                            for m in range(rec.map_id.shape[0])])
    expected = np.maximum(1, np.ceil(feature_len / SEGMENT_LENGTH)).sum()
    assert len(segs) == expected
    assert abs(lengths.sum() - feature_len.sum()) < 1e-3 * feature_len.sum()
    # lane points, put back in the world, lie on the original lanes (stored every 0.5 m)
    local = segs.features[:, :-1].reshape(-1, POINTS_PER_SEGMENT, 2)
    world = compose(segs.pose[:, None, :], np.concatenate([local, np.zeros_like(local[..., :1])], -1))[..., :2]
    lanes = segs.kind_subtype // 32 == LANE
    sample = world[lanes][::10].reshape(-1, 2)
    lane_points = np.concatenate([rec.map_polyline(m)[:, :2] for m in np.nonzero(rec.map_kind == LANE)[0]])
    d = np.linalg.norm(sample[:, None] - lane_points[None], axis=-1).min(1)
    assert d.max() < 0.3
    # traffic-light states reach the lane segments they control
    assert (segs.tl_state > 0).any()
    assert ((segs.kind_subtype // 32)[segs.tl_state > 0] == LANE).all()
