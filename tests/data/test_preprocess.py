"""Batch preprocessing: good scenarios land in shards, bad records are reported, shards are atomic."""

from __future__ import annotations

import json

import numpy as np
import pytest

from smart_r1.cli import main
from smart_r1.data.dataset import ScenarioDataset
from smart_r1.data.preprocess import REPORT_NAME, convert_file
from smart_r1.data.tfrecord import RecordError, read_records, write_records
from smart_r1.data.womd import parse_scenario, read_scenario_protos


@pytest.fixture(scope="module")
def good_bytes(womd_path) -> bytes:
    return next(read_records(womd_path))


def _variant(good: bytes, womd_path, edit) -> bytes:
    proto = next(read_scenario_protos(womd_path))
    edit(proto)
    return proto.SerializeToString()


def _drop_last_step(proto):
    del proto.timestamps_seconds[-1]
    for t in proto.tracks:
        del t.states[-1]


def _nan_position(proto):
    proto.tracks[0].states[12].center_x = float("nan")


def test_bad_records_are_named(good_bytes, womd_path, tmp_path):
    wrong_steps = _variant(good_bytes, womd_path, _drop_last_step)
    with pytest.raises(RecordError, match=r"f.tfrecord: record 3: .*has 90 steps"):
        parse_scenario(wrong_steps, tmp_path / "f.tfrecord", 3)
    nan = _variant(good_bytes, womd_path, _nan_position)
    with pytest.raises(RecordError, match=r"record 1: .*NaN"):
        parse_scenario(nan, "f.tfrecord", 1)
    with pytest.raises(RecordError, match="record 0"):
        parse_scenario(b"\x0a\xff\xff\xff\xff", "f.tfrecord", 0)


def test_bad_crc_and_truncation(good_bytes, tmp_path):
    path = tmp_path / "crc.tfrecord"
    write_records(path, [good_bytes, good_bytes])
    raw = bytearray(path.read_bytes())
    raw[12 + 100] ^= 0xFF  # a byte inside the first record's payload
    path.write_bytes(bytes(raw))
    with pytest.raises(RecordError, match=r"crc.tfrecord: record 0: bad data CRC"):
        list(read_records(path))
    write_records(path, [good_bytes, good_bytes])
    path.write_bytes(path.read_bytes()[:-50])
    got = []
    with pytest.raises(RecordError, match="record 1: truncated"):
        for data in read_records(path):
            got.append(data)
    assert got == [good_bytes]


def test_batch_goes_on_reports_and_fails(good_bytes, womd_path, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_records(raw / "a.tfrecord", [good_bytes, good_bytes])
    write_records(raw / "b.tfrecord", [
        good_bytes,
        b"this is not a scenario proto",
        _variant(good_bytes, womd_path, _drop_last_step),
        _variant(good_bytes, womd_path, _nan_position),
        good_bytes,
    ])
    truncated = raw / "c.tfrecord"
    write_records(truncated, [good_bytes, good_bytes])
    truncated.write_bytes(truncated.read_bytes()[:-10])
    out = tmp_path / "out"

    code = main(["preprocess", "--input", str(raw / "*.tfrecord"), "--out", str(out), "--workers", "2"])
    assert code == 1
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["files"] == 3 and report["scenarios"] == 2 + 2 + 1
    bad = {(b["file"].rsplit("/", 1)[1], b["record"]) for b in report["bad_records"]}
    assert bad == {("b.tfrecord", 1), ("b.tfrecord", 2), ("b.tfrecord", 3), ("c.tfrecord", 1)}
    assert "b.tfrecord: record 2" in capsys.readouterr().err
    assert len(ScenarioDataset(out)) == 5
    assert not list(out.glob(".*.tmp")), "no temporary files left behind"

    # A re-run skips finished shards yet still reports their bad records.
    (out / "a.parquet").unlink()
    code = main(["preprocess", "--input", str(raw / "*.tfrecord"), "--out", str(out), "--workers", "2"])
    report = json.loads((out / REPORT_NAME).read_text())
    assert code == 1 and report["files_skipped"] == 2 and report["scenarios"] == 5
    assert len(report["bad_records"]) == 4


def test_interrupted_write_leaves_no_shard(good_bytes, tmp_path, monkeypatch):
    src = tmp_path / "a.tfrecord"
    write_records(src, [good_bytes])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pyarrow.parquet.write_table", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_file(str(src), str(tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_input_is_a_clear_error(tmp_path, capsys):
    assert main(["preprocess", "--input", str(tmp_path / "none*.tfrecord"), "--out", str(tmp_path)]) == 2
    assert "no TFRecord files match" in capsys.readouterr().err


def test_loader_matches_tfrecord(womd_path, womd_record, tmp_path):
    assert main(["preprocess", "--input", str(womd_path), "--out", str(tmp_path)]) == 0
    (loaded,) = ScenarioDataset(tmp_path).records
    np.testing.assert_array_equal(loaded.xyz, womd_record.xyz)
    (direct,) = ScenarioDataset(str(womd_path)).records
    assert direct.scenario_id == loaded.scenario_id


def test_preprocess_reads_tfrecords_from_a_bucket(womd_path, tmp_path, moto_s3, capsys):
    """`preprocess --input s3://.../*.tfrecord*` (WOMD as a cloud copy keeps it): the files are
    listed and read through pyarrow.fs, the shards equal those of the local file, and a TFRecord
    URI is read by the scenario reader directly too."""
    from smart_r1.data.dataset import count_scenarios, iter_scenarios
    from smart_r1.storage import copy_file, glob_files, join, list_files

    # credentials in the URI: Ray's worker processes, started by earlier tests, lack the env's
    raw = f"s3://testing:testing@smart-r1/womd-{tmp_path.name}?{moto_s3}"
    for name in ("training.tfrecord-00000-of-00002", "training.tfrecord-00001-of-00002", "notes.txt"):
        copy_file(womd_path, join(raw, name))
    pattern = join(raw, "training.tfrecord-*")
    assert [f.split("?")[0].rsplit("/", 1)[1] for f in glob_files(pattern)] == [
        "training.tfrecord-00000-of-00002", "training.tfrecord-00001-of-00002"]
    assert glob_files(join(raw, "validation.tfrecord-*")) == []

    out = join(raw, "parquet")
    assert main(["preprocess", "--input", pattern, "--out", out, "--workers", "1"]) == 0
    assert list_files(out, ".parquet") == ["training-00000-of-00002.parquet", "training-00001-of-00002.parquet"]
    local = ScenarioDataset(str(womd_path)).records
    for read in (list(iter_scenarios(out)), list(iter_scenarios(join(raw, "training.tfrecord-00001-of-00002")))):
        assert [r.scenario_id for r in read] == [r.scenario_id for r in local] * (len(read) // len(local))
        np.testing.assert_array_equal(read[-1].xyz, local[-1].xyz)
    assert count_scenarios(pattern) == 2 * len(local)
    # a glob that matches nothing is the same clear error as for a local one
    assert main(["preprocess", "--input", join(raw, "nothing-*"), "--out", out]) == 2
    assert "no TFRecord files match" in capsys.readouterr().err
