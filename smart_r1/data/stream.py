"""Streaming a dataset's units (Parquet row groups, `smart_r1.data.index`) to data-parallel ranks:
each rank reads only its own units, in an order shuffled per epoch, through a bounded shuffle
buffer, so its memory holds a buffer of rows, never the dataset.

Per epoch, every rank shuffles the list of units with the same seeded RNG (seed and epoch: the
same on every rank, and again on a resumed run) and takes every world_size-th of them: the ranks'
units are disjoint and cover the data. When there are fewer units than ranks (a dataset of fewer
than world_size row groups, i.e. below ~32 x world_size scenarios), rank r takes unit r % U:
some units are read by several ranks in that epoch; each rank still shuffles its rows with its
own RNG. A rank draws as many rows as it is asked for (`count`, the same on every rank, since
their gradients are all-reduced step by step), going round its units again when it needs more
rows than they hold. Its next unit is read (and decoded) in a background thread while the rows of
the current one are used (`read_ahead`): reading a row group from a bucket overlaps training, and
a rank holds two decoded units at most.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def rank_units(num_units: int, rank: int, world_size: int, rng: random.Random) -> list[int]:
    """This rank's units for one epoch, in the epoch's order. `rng` must be seeded the same on
    every rank (it shuffles the shared list of units)."""
    if num_units < 1:
        raise ValueError("no data units to stream")
    order = list(range(num_units))
    rng.shuffle(order)
    if num_units < world_size:
        return [order[rank % num_units]]
    return order[rank::world_size]


def shuffle_buffer(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """`items` in a random order, holding at most `size` of them: each arriving item takes the
    place of a buffered one drawn at random, which is yielded; the rest leave in random order at
    the end. An item can move at most about `size` places earlier, any number later."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        k = rng.randrange(size)
        buffer[k], item = item, buffer[k]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def read_ahead(read_unit: Callable[[int], Sequence[T]], units: Sequence[int]) -> Iterator[Sequence[T]]:
    """The rows of each unit in turn; while the caller uses one unit's rows, the next unit is read
    by `read_unit` in a background thread (one at a time, so `read_unit` is never called twice at
    once). Holds the unit given out and the one being read; a read's error is raised here, in order."""
    units = list(units)
    if not units:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read_ahead") as reader:
        pending = reader.submit(read_unit, units[0])
        for unit in units[1:]:
            rows = pending.result()
            pending = reader.submit(read_unit, unit)
            yield rows
        yield pending.result()


def epoch_rows(read_unit: Callable[[int], Sequence[T]], units: Sequence[int], count: int,
               buffer: int, rng: random.Random) -> Iterator[T]:
    """Exactly `count` rows of `units`: pass after pass over the units (read in order, one ahead),
    each pass through a fresh shuffle buffer of `buffer` rows, so that within a pass every row comes once.
    ValueError when a whole pass gives no row."""
    drawn = 0
    while drawn < count:
        given = 0
        for row in shuffle_buffer((row for rows in read_ahead(read_unit, units) for row in rows), buffer, rng):
            if drawn == count:
                return
            yield row
            drawn, given = drawn + 1, given + 1
        if not given:
            raise ValueError(f"units {list(units)[:8]} hold no rows to train on")
