"""The scenario index: global index -> (shard, row group, row) from footers only; reads decode only
the row groups asked for, keep a bounded few, and give exactly the records a full read gives."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from smart_r1.data.dataset import iter_scenarios
from smart_r1.data.index import ShardIndex, footer_units, scenario_index
from smart_r1.data.parquet import SCHEMA, records_to_table, table_to_records


def _same(a, b) -> None:
    assert a.scenario_id == b.scenario_id
    for name, value in vars(a).items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, getattr(b, name))


@pytest.fixture(scope="module")
def small_groups(sumo_shards, womd_record, tmp_path_factory):
    """The six SUMO scenarios and the real WOMD one in two shards with row groups of 2 rows:
    shard 0 = SUMO 0..3 (groups of 2, 2), shard 1 = SUMO 4, 5, WOMD (groups of 2, 1)."""
    records = list(iter_scenarios(sumo_shards)) + [womd_record]
    out = tmp_path_factory.mktemp("index")
    for k, part in enumerate((records[:4], records[4:])):
        pq.write_table(records_to_table(part), out / f"part-{k}.parquet", row_group_size=2)
    return out, records


def test_units_and_locations_come_from_the_footers(small_groups):
    folder, records = small_groups
    units = footer_units([str(folder / "part-0.parquet"), str(folder / "part-1.parquet")])
    assert [(u.shard, u.group, u.first, u.rows) for u in units] == [(0, 0, 0, 2), (0, 1, 2, 2), (1, 0, 4, 2),
                                                                    (1, 1, 6, 1)]
    index = scenario_index(folder)
    assert len(index) == len(records) == 7
    unit, row = index.locate([0, 3, 4, 6])
    assert unit.tolist() == [0, 1, 2, 3] and row.tolist() == [0, 1, 0, 0]
    with pytest.raises(IndexError, match="7"):
        index.read([7])


def test_reads_decode_only_their_row_groups_and_keep_a_bounded_few(small_groups):
    folder, records = small_groups
    decoded = []

    def decode(table):
        decoded.append(table.num_rows)
        return list(table_to_records(table))

    index = ShardIndex([str(folder / "part-0.parquet"), str(folder / "part-1.parquet")], decode, SCHEMA,
                       cache_groups=2)
    got = index.read([6, 1, 0, 5])  # units 3, 0, 0, 2: three row groups, each decoded once
    for a, b in zip(got, [records[i] for i in (6, 1, 0, 5)]):
        _same(a, b)
    assert sorted(decoded) == [1, 2, 2] and len(index._cache) == 2
    index.read([4])  # unit 2 is still cached
    assert len(decoded) == 3
    index.read([2])  # unit 1: decoded, the least recently used dropped
    assert len(decoded) == 4 and len(index._cache) == 2


def test_every_record_reads_back_whole_by_index_from_a_uri(small_groups):
    folder, records = small_groups
    index = scenario_index(f"file://{folder}")
    order = np.random.default_rng(0).permutation(len(records)).tolist()
    for i, record in zip(order, index.read(order)):
        _same(record, records[i])


def test_a_tfrecord_is_held_in_memory_for_small_local_uses(womd_path, womd_record):
    index = scenario_index(womd_path)
    assert len(index) == 1 and len(index.units) == 1
    _same(index.read([0])[0], womd_record)
