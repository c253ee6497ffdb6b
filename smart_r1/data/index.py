"""Random access to the rows of Parquet shards by one global index, from the shards' footers.

A dataset of N rows in S shards is read as a list of units, one per (shard, row group) (row
groups hold `parquet.ROW_GROUP_ROWS` rows, 32): opening an index reads only the footers (row
counts per row group), so opening WOMD's 487k scenarios costs a few KB per shard, never the data.
Global index i lives in unit u = the last unit whose first row is <= i, at row i - first[u].

Reading indices decodes only the row groups they live in, and keeps the last few decoded ones
(a small LRU), so a rollout actor handed scenarios 40, 41, 42 decodes one row group, and its
memory holds `cache_groups` row groups whatever the dataset's size.

The rows are decoded by a function of the row group's Arrow table (`decode`): scenario records
(`scenario_index`) or tokenised scenes (`smart_r1.tokens.shards`). TFRecord inputs (the shared
WOMD scenario, small files) have no footer: `scenario_index` holds their records in memory, cut
into units of the same size, for small uses only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from smart_r1.data.dataset import data_source, is_tfrecord, iter_scenarios
from smart_r1.data.parquet import ROW_GROUP_ROWS, SCHEMA, shard_paths, table_to_records
from smart_r1.storage import display, open_input
from smart_r1.types import ScenarioRecord

T = TypeVar("T")


@dataclass(frozen=True)
class Unit:
    """One row group: the smallest piece a reader decodes.

    shard: index into the index's `shards`; group: the row group in that shard;
    first: global index of its first row; rows: how many rows it holds."""

    shard: int
    group: int
    first: int
    rows: int


def footer_units(shards: Sequence[str]) -> list[Unit]:
    """The units of `shards` in order (shard by shard, row group by row group), read from their
    footers only; empty row groups are left out."""
    units, first = [], 0
    for s, path in enumerate(shards):
        with open_input(path) as f:
            meta = pq.ParquetFile(f).metadata
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            if rows:
                units.append(Unit(s, g, first, rows))
                first += rows
    return units


def read_row_group(path: str, group: int, schema: pa.Schema | None = None) -> pa.Table:
    """Row group `group` of the shard at `path` (local or URI), nothing else of the file."""
    with open_input(path) as f:
        table = pq.ParquetFile(f).read_row_group(group)
    return table.cast(schema) if schema is not None else table


class ShardIndex(Generic[T]):
    """Rows of Parquet shards by global index. `decode(table) -> list[T]` turns one row group's
    table into its rows; the last `cache_groups` decoded row groups are kept (least recently used
    dropped first)."""

    def __init__(self, shards: Sequence[str], decode: Callable[[pa.Table], list[T]],
                 schema: pa.Schema | None = None, cache_groups: int = 2):
        self.shards = [str(s) for s in shards]
        self.units = footer_units(self.shards)
        self._starts = np.array([u.first for u in self.units], dtype=np.int64)  # [U]
        self._decode, self._schema = decode, schema
        self._cache: OrderedDict[int, list[T]] = OrderedDict()
        self.cache_groups = max(1, cache_groups)

    def __len__(self) -> int:
        return self.units[-1].first + self.units[-1].rows if self.units else 0

    def locate(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(unit [n], row within the unit [n]) of global indices [n]; IndexError outside [0, len)."""
        i = np.asarray(indices, dtype=np.int64).reshape(-1)  # [n]
        if i.size and (i.min() < 0 or i.max() >= len(self)):
            bad = int(i[(i < 0) | (i >= len(self))][0])
            raise IndexError(f"scenario index {bad} out of range: the data holds {len(self)}")
        unit = np.searchsorted(self._starts, i, side="right") - 1  # [n]
        return unit, i - self._starts[unit]

    def read_unit(self, unit: int) -> list[T]:
        """The decoded rows of one unit (through the LRU)."""
        if unit in self._cache:
            self._cache.move_to_end(unit)
            return self._cache[unit]
        u = self.units[unit]
        rows = self._decode(read_row_group(self.shards[u.shard], u.group, self._schema))
        self._cache[unit] = rows
        while len(self._cache) > self.cache_groups:
            self._cache.popitem(last=False)
        return rows

    def read(self, indices: Sequence[int]) -> list[T]:
        """The rows at `indices`, in that order; each row group they touch is decoded once (they
        are read unit by unit, so a unit is not dropped from the cache while still needed)."""
        units, rows = self.locate(indices)
        out: list = [None] * len(units)
        for unit in np.unique(units):
            decoded = self.read_unit(int(unit))
            for k in np.nonzero(units == unit)[0]:
                out[k] = decoded[rows[k]]
        return out

    def __repr__(self) -> str:
        first = display(self.shards[0]) if self.shards else "-"
        return f"ShardIndex({len(self)} rows in {len(self.shards)} shards, {len(self.units)} row groups; {first} ...)"


class MemoryIndex(Generic[T]):
    """The same reads over rows already in memory (TFRecord inputs: small local data only), cut
    into units of `unit_rows`."""

    def __init__(self, rows: Sequence[T], unit_rows: int = ROW_GROUP_ROWS):
        self.rows = list(rows)
        self.units = [Unit(0, g, first, min(unit_rows, len(self.rows) - first))
                      for g, first in enumerate(range(0, len(self.rows), unit_rows))]

    def __len__(self) -> int:
        return len(self.rows)

    def read_unit(self, unit: int) -> list[T]:
        u = self.units[unit]
        return self.rows[u.first:u.first + u.rows]

    def read(self, indices: Sequence[int]) -> list[T]:
        for i in indices:
            if not 0 <= i < len(self.rows):
                raise IndexError(f"scenario index {i} out of range: the data holds {len(self.rows)}")
        return [self.rows[i] for i in indices]


def _records(table: pa.Table) -> list[ScenarioRecord]:
    return list(table_to_records(table))


def scenario_index(data: str | Path | Sequence[str], cache_groups: int = 2
                   ) -> ShardIndex[ScenarioRecord] | MemoryIndex[ScenarioRecord]:
    """ScenarioRecords of `data` by global index (the order of `iter_scenarios`): a folder or URI
    of Parquet shards (footers read now, rows on demand), or TFRecord file(s), local or URI
    (parsed now, held). A list of Parquet folders is one index over their shards in turn (a folder
    listed k times is drawn k times as often: a stage's training mixture)."""
    if isinstance(data, (list, tuple)):
        shards = [str(s) for folder in data for s in shard_paths(folder)]
        if not shards:
            raise FileNotFoundError(f"{list(data)} hold no .parquet shards")
        return ShardIndex(shards, _records, SCHEMA, cache_groups)
    text = data_source(data)
    if is_tfrecord(text):
        return MemoryIndex(list(iter_scenarios(text)))
    shards = shard_paths(data)
    if not shards:
        raise FileNotFoundError(f"{data} holds no .parquet shards (run `smart-r1 preprocess` first)")
    return ShardIndex([str(s) for s in shards], _records, SCHEMA, cache_groups)
