"""Load preprocessed scenarios: from Parquet shards (the fast path) or straight from TFRecords."""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from smart_r1.data.parquet import num_rows, read_shard, shard_paths
from smart_r1.data.tfrecord import read_records
from smart_r1.data.womd import read_scenarios
from smart_r1.storage import base_name, display, glob_files, is_dir, is_uri
from smart_r1.types import ScenarioRecord


class ScenarioDataset(torch.utils.data.Dataset):
    """All scenarios of a preprocessed folder, held in memory (WOMD shards are a few MB each).

    `data` is a folder of Parquet shards, one shard, or a TFRecord file / glob (parsed directly).
    """

    def __init__(self, data: str | Path, limit: int | None = None):
        self.records = list(iter_scenarios(data, limit))
        if not self.records:
            raise ValueError(f"no scenarios found in {data}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ScenarioRecord:
        return self.records[i]

    def __iter__(self) -> Iterator[ScenarioRecord]:
        return iter(self.records)


def expand_inputs(pattern: str) -> list[str]:
    """The files a TFRecord path or glob names, sorted; FileNotFoundError when none. A URI
    (`s3://bucket/womd/training.tfrecord-*`, `gs://...`) is listed through pyarrow.fs: a glob on
    the base name, a folder (its `*.tfrecord*` files) or one file."""
    if is_uri(pattern):
        paths = glob_files(pattern)
        if is_dir(pattern):
            paths = [p for p in paths if ".tfrecord" in base_name(p)]
        if not paths:
            raise FileNotFoundError(f"no TFRecord files match {display(pattern)!r}")
        return paths
    paths = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    paths = [p for p in paths if Path(p).is_file()]
    if not paths:
        raise FileNotFoundError(f"no TFRecord files match {pattern!r}")
    return paths


def is_tfrecord(text: str) -> bool:
    """Whether a data path, glob or URI names TFRecord files (else: Parquet shards)."""
    return ".tfrecord" in (base_name(text) if is_uri(text) else text)


def data_source(path: str | Path) -> str:
    """A folder of Parquet shards as is; a folder of TFRecords as a glob over them. A URI
    (`file://`, `s3://`, `gs://`) names Parquet shards (a folder or one shard), or TFRecords
    when its base name has `.tfrecord` in it (one file or a glob)."""
    if is_uri(path):
        return str(path)
    p = Path(path)
    if p.is_dir() and not list(p.glob("*.parquet")) and glob.glob(str(p / "*.tfrecord*")):
        return str(p / "*.tfrecord*")
    return str(path)


def count_scenarios(data: str | Path) -> int:
    """How many scenarios `data` holds, without parsing them (for a progress bar's ETA)."""
    text = data_source(data)
    if is_tfrecord(text):
        return sum(1 for path in expand_inputs(text) for _ in read_records(path))
    return sum(num_rows(path) for path in shard_paths(text))


def iter_scenarios(data: str | Path, limit: int | None = None) -> Iterator[ScenarioRecord]:
    """Yield scenarios from Parquet shards, or from TFRecords when `data` names TFRecord files
    (a file, a glob, or a folder of them). Parquet shards may live in a local folder or under a
    URI (`file://`, `s3://bucket/prefix`, `gs://...`, read through pyarrow.fs); they are read one
    row group at a time, so memory holds what the caller keeps, not the dataset."""
    text = data_source(data)
    if is_tfrecord(text):
        sources = (rec for path in expand_inputs(text) for rec in read_scenarios(path))
    else:
        paths = shard_paths(data)
        if not paths:
            raise FileNotFoundError(f"{data} holds no .parquet shards (run `smart-r1 preprocess` first)")
        sources = (rec for path in paths for rec in read_shard(path))
    for n, record in enumerate(sources):
        if limit is not None and n >= limit:
            return
        yield record


def to_torch(record: ScenarioRecord, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The record's arrays as tensors (float64 positions become float32, relative to nothing)."""
    out = {}
    for name, value in vars(record).items():
        if isinstance(value, np.ndarray):
            if value.dtype == np.float64:
                value = value.astype(np.float32)
            out[name] = torch.as_tensor(value, device=device)
    return out
