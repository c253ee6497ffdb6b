"""Parquet shards of scenarios: one row per scenario, written atomically, read fast.

Schema (one row = one `ScenarioRecord`; arrays are stored flat, row-major, and reshaped on load
with the count columns):

    scenario_id          string
    current_time_index   int32
    sdc_index            int32
    num_agents           int32     A
    num_steps            int32     T
    num_tl_lanes         int32     L
    timestamps           list<double>   [T]
    object_id            list<int64>    [A]
    object_type          list<int8>     [A]
    xyz                  list<double>   [A * T * 3]
    heading              list<float>    [A * T]
    velocity             list<float>    [A * T * 2]
    size                 list<float>    [A * T * 3]
    valid                list<bool>     [A * T]
    tracks_to_predict    list<int32>    [K]
    difficulty           list<int8>     [K]
    objects_of_interest  list<int64>    [I]
    map_id               list<int64>    [M]
    map_kind             list<int8>     [M]
    map_subtype          list<int8>     [M]
    map_speed_limit      list<double>   [M]
    map_offsets          list<int64>    [M + 1]
    map_points           list<double>   [P * 3]
    tl_lane_id           list<int64>    [L]
    tl_state             list<int8>     [T * L]
    tl_stop_point        list<double>   [L * 3]
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from smart_r1.storage import is_dir, is_uri, join, list_files, open_input, resolve, write_bytes
from smart_r1.types import ScenarioRecord

_SCALARS = {"current_time_index": pa.int32(), "sdc_index": pa.int32()}
_COUNTS = ("num_agents", "num_steps", "num_tl_lanes")
_ARRAYS = {
    "timestamps": pa.float64(), "object_id": pa.int64(), "object_type": pa.int8(),
    "xyz": pa.float64(), "heading": pa.float32(), "velocity": pa.float32(), "size": pa.float32(),
    "valid": pa.bool_(), "tracks_to_predict": pa.int32(), "difficulty": pa.int8(),
    "objects_of_interest": pa.int64(), "map_id": pa.int64(), "map_kind": pa.int8(),
    "map_subtype": pa.int8(), "map_speed_limit": pa.float64(), "map_offsets": pa.int64(),
    "map_points": pa.float64(), "tl_lane_id": pa.int64(), "tl_state": pa.int8(),
    "tl_stop_point": pa.float64(),
}
ROW_GROUP_ROWS = 32  # scenarios per row group: the unit a reader decodes at a time
SCHEMA = pa.schema(
    [pa.field("scenario_id", pa.string())]
    + [pa.field(k, v) for k, v in _SCALARS.items()]
    + [pa.field(k, pa.int32()) for k in _COUNTS]
    + [pa.field(k, pa.list_(v)) for k, v in _ARRAYS.items()]
)


def _shape(name: str, a: int, t: int, l: int) -> tuple[int, ...]:
    return {"xyz": (a, t, 3), "heading": (a, t), "velocity": (a, t, 2), "size": (a, t, 3),
            "valid": (a, t), "map_points": (-1, 3), "tl_state": (t, l), "tl_stop_point": (l, 3)}.get(name, (-1,))


def records_to_table(records: Sequence[ScenarioRecord]) -> pa.Table:
    columns: dict[str, list] = {"scenario_id": [r.scenario_id for r in records]}
    for k in _SCALARS:
        columns[k] = [int(getattr(r, k)) for r in records]
    columns["num_agents"] = [r.num_agents for r in records]
    columns["num_steps"] = [r.num_steps for r in records]
    columns["num_tl_lanes"] = [int(r.tl_lane_id.shape[0]) for r in records]
    for k, dtype in _ARRAYS.items():
        columns[k] = pa.array([np.ascontiguousarray(getattr(r, k)).reshape(-1) for r in records],
                              type=pa.list_(dtype))
    return pa.table(columns, schema=SCHEMA)


def write_table(path: str | Path, table: pa.Table) -> Path | str:
    """Write a table to `path` as Parquet (zstd, row groups of ROW_GROUP_ROWS) atomically: a
    temporary file in the same folder, then a rename; to a URI (`s3://`, `gs://`) as one upload
    (the object appears whole or not at all)."""
    if is_uri(path) and resolve(path)[0] is not None:
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        write_bytes(path, buffer.getvalue().to_pybytes())
        return str(path)
    path = Path(resolve(path)[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_shard(path: str | Path, records: Sequence[ScenarioRecord]) -> Path | str:
    """Write records to `path` atomically (`write_table`)."""
    return write_table(path, records_to_table(records))


def table_to_records(table: pa.Table) -> Iterator[ScenarioRecord]:
    """Yield records from a table; arrays are views into one numpy buffer per column."""
    n = table.num_rows
    if n == 0:
        return
    plain = {k: table.column(k).to_pylist() for k in ("scenario_id", *_SCALARS, *_COUNTS)}
    flat = {}
    for k in _ARRAYS:
        col = table.column(k).combine_chunks()
        values = col.values.to_numpy(zero_copy_only=False)
        flat[k] = (values, col.offsets.to_numpy())
    for i in range(n):
        a, t, l = plain["num_agents"][i], plain["num_steps"][i], plain["num_tl_lanes"][i]
        fields = {}
        for k, (values, offsets) in flat.items():
            fields[k] = values[offsets[i] : offsets[i + 1]].reshape(_shape(k, a, t, l))
        yield ScenarioRecord(
            scenario_id=plain["scenario_id"][i],
            current_time_index=plain["current_time_index"][i],
            sdc_index=plain["sdc_index"][i],
            **fields,
        )


def read_shard(path: str | Path) -> Iterator[ScenarioRecord]:
    """The records of one shard (a local path or a URI), decoded one row group at a time: only
    that row group is in memory, never the whole shard (let alone the dataset)."""
    with open_input(path) as f:
        shard = pq.ParquetFile(f)
        for i in range(shard.num_row_groups):
            yield from table_to_records(shard.read_row_group(i).cast(SCHEMA))


def num_rows(path: str | Path) -> int:
    """Scenarios in one shard, from its footer."""
    with open_input(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def shard_paths(data: str | Path) -> list[Path] | list[str]:
    """The Parquet shards of a preprocessed folder (or a single shard), sorted; a local folder or
    a URI (`file://`, `s3://`, `gs://`: listed through pyarrow.fs, returned as URIs)."""
    if is_uri(data):
        if str(data).split("?")[0].endswith(".parquet") and not is_dir(data):
            return [str(data)]
        return [join(data, name) for name in list_files(data, ".parquet")]
    data = Path(data)
    if data.is_file():
        return [data]
    if not data.is_dir():
        raise FileNotFoundError(f"no such data folder: {data}")
    return sorted(p for p in data.glob("*.parquet") if not p.name.startswith("."))
