"""Datasets by URI: `smart-r1 preprocess --out` and the scenario reader take a local folder or a
URI (`file://`, `s3://` against moto's S3 server on 127.0.0.1), write shards whole or not at all,
resume, and read one row group at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from smart_r1.cli import main
from smart_r1.data import parquet
from smart_r1.data.dataset import count_scenarios, iter_scenarios
from smart_r1.data.preprocess import REPORT_NAME
from smart_r1.storage import join, list_files, read_bytes, write_json


@pytest.fixture(scope="module")
def raw(sumo_tfrecords) -> Path:
    """Six generated SUMO scenarios in two TFRecord files (tests/conftest.py)."""
    return sumo_tfrecords


@pytest.fixture(scope="module")
def local(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "parquet"
    assert main(["preprocess", "--input", str(raw / "*.tfrecord"), "--out", str(out), "--workers", "1"]) == 0
    return out


def _same(a, b) -> None:
    assert [r.scenario_id for r in a] == [r.scenario_id for r in b]
    for x, y in zip(a, b):
        for name, value in vars(x).items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(value, getattr(y, name))


@pytest.fixture(scope="module")
def s3_root(moto_s3):
    """A prefix in the bucket on moto's S3 server (tests/conftest.py): a URI that pyarrow's
    `FileSystem.from_uri` resolves with the endpoint and the (fake) credentials in it, so Ray's
    worker processes need no environment of their own."""
    return f"s3://testing:testing@smart-r1/data?{moto_s3}&allow_bucket_creation=true"


def test_file_uri_preprocess_reads_back_as_the_local_folder(raw, local, tmp_path):
    out = tmp_path / "viauri"
    uri = out.as_uri()  # file:///...
    assert main(["preprocess", "--input", str(raw / "*.tfrecord"), "--out", uri, "--workers", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in local.iterdir())
    assert not list(out.glob(".*")), "no temporary files left behind"
    _same(list(iter_scenarios(uri)), list(iter_scenarios(local)))
    assert count_scenarios(uri) == count_scenarios(local) == 6
    assert list(iter_scenarios(uri, 2))[1].scenario_id == list(iter_scenarios(local, 2))[1].scenario_id
    # one shard named by URI
    (first,) = [s for s in parquet.shard_paths(uri) if s.endswith("-00000-of-00002.parquet")]
    assert len(list(iter_scenarios(first))) == 3

    # resumable: a re-run skips the shards that are there and writes the missing one
    (out / "sumo-00000-of-00002.parquet").unlink()
    assert main(["preprocess", "--input", str(raw / "*.tfrecord"), "--out", uri, "--workers", "1"]) == 0
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["files_skipped"] == 1 and report["scenarios"] == 6


def test_reader_streams_one_row_group_at_a_time(local, tmp_path, monkeypatch):
    records = list(iter_scenarios(local))
    many = records * 12  # 72 scenarios: three row groups of ROW_GROUP_ROWS (32)
    shard = parquet.write_shard(tmp_path / "many.parquet", many)
    assert pq.ParquetFile(shard).num_row_groups == 3
    reads = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **k: reads.append(i) or original(self, i, *a, **k))
    stream = iter_scenarios(tmp_path.as_uri())
    first = next(stream)
    assert reads == [0], "the first scenario decodes only the first row group"
    rest = list(stream)
    assert reads == [0, 1, 2] and len(rest) == 71
    _same([first, *rest], many)


def test_missing_uri_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data folder"):
        list(iter_scenarios((tmp_path / "absent").as_uri()))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .parquet shards"):
        list(iter_scenarios(empty.as_uri()))


def test_s3_preprocess_and_read(raw, local, s3_root):
    """`preprocess --out s3://...` (Ray tasks write through pyarrow's S3 filesystem), read back."""
    assert main(["preprocess", "--input", str(raw / "*.tfrecord"), "--out", s3_root, "--workers", "1"]) == 0
    assert list_files(s3_root, ".parquet") == sorted(p.name for p in local.glob("*.parquet"))
    assert REPORT_NAME in list_files(s3_root, ".json")
    _same(list(iter_scenarios(s3_root)), list(iter_scenarios(local)))
    assert count_scenarios(s3_root) == 6
    # resumable on the bucket too: a deleted shard is rewritten, the other skipped
    fs, key = pafs.FileSystem.from_uri(join(s3_root, "sumo-00001-of-00002.parquet"))
    fs.delete_file(key)
    assert main(["preprocess", "--input", str(raw / "*.tfrecord"), "--out", s3_root, "--workers", "1"]) == 0
    report = json.loads(read_bytes(join(s3_root, REPORT_NAME)))
    assert report["files_skipped"] == 1 and report["scenarios"] == 6
    assert len(list(iter_scenarios(s3_root))) == 6
    write_json(join(s3_root, "x/y.json"), {"a": 1})  # storage writes to the bucket as well
    assert list_files(join(s3_root, "x"), ".json") == ["y.json"]
