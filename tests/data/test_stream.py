"""Streaming units to ranks: disjoint covering assignments, a bounded shuffle buffer, exactly the
rows asked for, every row once per pass."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from smart_r1.data.stream import epoch_rows, rank_units, shuffle_buffer


def test_ranks_get_disjoint_units_that_cover_the_data_in_a_new_order_each_epoch():
    parts = [rank_units(10, r, 3, random.Random(5)) for r in range(3)]
    assert sorted(u for p in parts for u in p) == list(range(10))
    assert [len(p) for p in parts] == [4, 3, 3]
    assert rank_units(10, 0, 3, random.Random(6)) != parts[0]  # another epoch's seed


def test_fewer_units_than_ranks_share_units():
    parts = [rank_units(2, r, 5, random.Random(0)) for r in range(5)]
    assert all(len(p) == 1 for p in parts)
    assert Counter(p[0] for p in parts) == {parts[0][0]: 3, parts[1][0]: 2}
    with pytest.raises(ValueError, match="no data units"):
        rank_units(0, 0, 1, random.Random(0))


def test_shuffle_buffer_is_a_permutation_holding_at_most_its_size():
    pulled = []

    def source():
        for i in range(200):
            pulled.append(i)
            yield i

    out = []
    for item in shuffle_buffer(source(), 16, random.Random(1)):
        assert len(pulled) - len(out) - 1 <= 16  # read, not yet given out (`item` is given)
        out.append(item)
    assert sorted(out) == list(range(200)) and out != list(range(200))


def test_epoch_rows_gives_the_count_each_row_once_per_pass():
    units = {0: [0, 1, 2], 1: [3, 4], 2: [], 3: [5]}
    rows = list(epoch_rows(units.__getitem__, [0, 1, 2, 3], 6, 4, random.Random(2)))
    assert sorted(rows) == list(range(6))
    more = list(epoch_rows(units.__getitem__, [0, 1, 2, 3], 14, 4, random.Random(2)))
    assert len(more) == 14 and Counter(Counter(more).values()) == {3: 2, 2: 4}  # two passes and two rows
    assert list(epoch_rows(units.__getitem__, [1], 0, 4, random.Random(2))) == []
    with pytest.raises(ValueError, match="no rows"):
        list(epoch_rows(units.__getitem__, [2], 1, 4, random.Random(2)))


def test_the_next_unit_is_read_in_the_background_while_the_current_one_is_used():
    import threading

    from smart_r1.data.stream import read_ahead

    calls, asked = [], {u: threading.Event() for u in range(4)}

    def read_unit(unit):
        calls.append((unit, threading.current_thread().name))
        asked[unit].set()
        if unit == 3:
            raise OSError("row group 3 unreadable")
        return [unit * 10, unit * 10 + 1]

    units = read_ahead(read_unit, [0, 1, 2, 3])
    assert next(units) == [0, 1]
    assert asked[1].wait(5), "unit 1 is read while unit 0 is in use"
    assert not asked[2].wait(0.2), "one unit ahead, no more"
    assert next(units) == [10, 11] and asked[2].wait(5)
    assert all(name.startswith("read_ahead") for _, name in calls)
    assert next(units) == [20, 21]
    with pytest.raises(OSError, match="row group 3"):  # a failed read surfaces where its rows are asked for
        next(units)
    assert [u for u, _ in calls] == [0, 1, 2, 3]
