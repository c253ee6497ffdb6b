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
rows than they hold.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
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


def epoch_rows(read_unit: Callable[[int], Sequence[T]], units: Sequence[int], count: int,
               buffer: int, rng: random.Random) -> Iterator[T]:
    """Exactly `count` rows of `units`: pass after pass over the units (read in order), each pass
    through a fresh shuffle buffer of `buffer` rows, so that within a pass every row comes once.
    ValueError when a whole pass gives no row."""
    drawn = 0
    while drawn < count:
        given = 0
        for row in shuffle_buffer((row for unit in units for row in read_unit(unit)), buffer, rng):
            if drawn == count:
                return
            yield row
            drawn, given = drawn + 1, given + 1
        if not given:
            raise ValueError(f"units {list(units)[:8]} hold no rows to train on")
