"""Batches bucketed by scene size: every draw exactly once, less padding, still random, lazy."""

from __future__ import annotations

import itertools
import random
from collections import Counter

from smart_r1.tokens.scene import size_bucketed


def _padded(batches, sizes) -> int:
    """Padded work of batches of (agents, map segments) scenes: a batch pads to its largest."""
    return sum(len(b) * (75 * max(sizes[i][0] for i in b) + max(sizes[i][1] for i in b)) for b in batches)


def test_every_draw_exactly_once_and_less_padding():
    rng = random.Random(0)
    sizes = {i: (rng.randint(2, 64), rng.randint(300, 2048)) for i in range(100)}
    draws = list(range(100)) + [3, 7, 3]  # a rank that wraps around draws some scenes twice
    random.Random(1).shuffle(draws)
    batches = list(size_bucketed(draws, 4, sizes.__getitem__, random.Random(2)))
    assert Counter(i for b in batches for i in b) == Counter(draws)
    assert [len(b) for b in batches] == [4] * 25 + [3]
    plain = [draws[i:i + 4] for i in range(0, len(draws), 4)]
    assert _padded(batches, sizes) < 0.9 * _padded(plain, sizes)


def test_batches_stay_random_and_windows_sort_only_when_reached():
    sizes = {i: (i % 13, 0) for i in range(64)}
    draws = list(range(64))
    one = list(size_bucketed(draws, 4, sizes.__getitem__, random.Random(0)))
    two = list(size_bucketed(draws, 4, sizes.__getitem__, random.Random(1)))
    assert one != two  # batch order within a window is shuffled
    assert one == list(size_bucketed(draws, 4, sizes.__getitem__, random.Random(0)))  # reproducible
    asked = []
    lazy = size_bucketed(draws, 4, lambda i: asked.append(i) or sizes[i], random.Random(0), window_batches=2)
    first = list(itertools.islice(lazy, 2))
    assert sorted(asked) == sorted(draws[:8]) and sorted(i for b in first for i in b) == sorted(draws[:8])
