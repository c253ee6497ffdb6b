"""Atomic writes and the crash-consistent stage log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from smart_r1.storage import read_jsonl, save_torch, truncate_log, write_bytes, write_json, write_log_row


def test_writes_replace_whole_files_and_leave_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json(path, {"x": 1})
    write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    save_torch({"w": torch.ones(3)}, tmp_path / "w.pt")
    assert torch.equal(torch.load(tmp_path / "w.pt", weights_only=True)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.json", "sub", "w.pt"]


def test_a_writer_killed_mid_write_leaves_the_old_file(tmp_path):
    """SIGKILL a process while it writes 200 MB over a file: the file is the old one, whole."""
    path = tmp_path / "big.bin"
    write_bytes(path, b"old")
    code = ("import sys; from smart_r1.storage import write_bytes; "
            "print('go', flush=True); write_bytes(sys.argv[1], b'x' * 200_000_000)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"go"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert path.read_bytes() in (b"old", b"x" * 200_000_000)


def test_local_logs_are_appended_and_rows_of_redone_steps_dropped(tmp_path):
    log = tmp_path / "train_log.jsonl"
    sizes = []
    for step in range(4):
        write_log_row(log, {"progress": step, "loss": float(step)})
        sizes.append(log.stat().st_size)
    inode = log.stat().st_ino
    assert log.read_text().startswith('{"progress": 0') and sizes == sorted(set(sizes))
    assert log.stat().st_ino == inode, "appended in place, never rewritten"
    truncate_log(log, 2)  # resumed after step 1: steps 2 and 3 are redone
    assert [r["progress"] for r in read_jsonl(log)] == [0, 1]
    write_log_row(log, {"progress": 2, "loss": 20.0})
    with open(log, "a") as f:  # a crash in the middle of appending step 3's row
        f.write('{"progress": 3, "lo')
    assert [(r["progress"], r["loss"]) for r in read_jsonl(log)] == [(0, 0.0), (1, 1.0), (2, 20.0)]
    truncate_log(log, 3)  # the resumed run drops the torn row before it appends again
    write_log_row(log, {"progress": 3, "loss": 30.0})
    assert [r["progress"] for r in read_jsonl(log)] == [0, 1, 2, 3]


def test_a_buckets_filesystem_is_built_once_and_keys_match_pyarrows():
    import pyarrow.fs as pafs

    from smart_r1.storage import resolve

    query = "endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    uris = [f"s3://bucket/runs/a/bc/done.json?{query}", f"s3://bucket/runs/a/?{query}", f"s3://bucket?{query}",
            f"s3://KEY:SECRET@bucket/runs/with%20space?{query}", f"s3://bucket/a//b?{query}"]
    for uri in uris[:4]:
        assert resolve(uri)[1] == pafs.FileSystem.from_uri(uri)[1], uri
    assert resolve(uris[0])[0] is resolve(uris[1])[0], "one filesystem per bucket and options"
    assert resolve(uris[0])[0] is not resolve(uris[3])[0], "other credentials: another filesystem"
    assert resolve(uris[4])[1] == "bucket/a//b"


def test_paths_and_uris_join_name_and_hide_secrets(tmp_path):
    from smart_r1.storage import base_name, display, join, parent, root

    uri = "s3://KEY:SECRET@bucket/runs/a?endpoint_override=127.0.0.1:9&scheme=http"
    assert join(uri, "bc", "done.json") == ("s3://KEY:SECRET@bucket/runs/a/bc/done.json"
                                            "?endpoint_override=127.0.0.1:9&scheme=http")
    assert parent(join(uri, "bc")) == uri
    assert base_name(uri) == "a" and base_name(join(uri, "bc")) == "bc" and base_name(tmp_path / "x") == "x"
    assert display(uri) == "s3://bucket/runs/a?endpoint_override=127.0.0.1:9&scheme=http"
    assert display(str(tmp_path)) == str(tmp_path)
    assert join(tmp_path, "bc", "done.json") == str(tmp_path / "bc" / "done.json")
    assert root((tmp_path / "r").as_uri()) == str(tmp_path / "r")  # file:// is a local folder
    assert root(uri) == uri


def test_reads_lists_copies_and_removals_through_a_file_uri(tmp_path):
    """The run-storage helpers on a file:// URI (the local filesystem through pyarrow.fs)."""
    from smart_r1.storage import (copy_file, copy_tree, exists, join, list_names, read_json, read_text, remove,
                                  remove_tree)

    base = (tmp_path / "root").as_uri()
    assert read_json(join(base, "run.json"), None) is None and list_names(base) == []
    with pytest.raises(FileNotFoundError):
        read_json(join(base, "run.json"))
    write_json(join(base, "run.json"), {"stages": {}})
    write_json(join(base, "bc", "done.json"), {"metrics": 1})
    write_json(join(base, "ray", "x.json"), {})
    (tmp_path / "state.pt").write_bytes(b"state")
    copy_file(tmp_path / "state.pt", join(base, "bc", "last_state.pt"))
    assert list_names(base) == ["bc", "ray", "run.json"]
    assert read_text(join(base, "bc", "last_state.pt")) == "state"
    log = join(base, "bc", "train_log.jsonl")
    for step in range(3):
        write_log_row(log, {"progress": step})
    truncate_log(log, 2)
    assert [r["progress"] for r in read_jsonl(log)] == [0, 1]
    copy_tree(base, tmp_path / "copy", skip=("ray",))
    assert sorted(p.relative_to(tmp_path / "copy").as_posix() for p in (tmp_path / "copy").rglob("*.*")) == [
        "bc/done.json", "bc/last_state.pt", "bc/train_log.jsonl", "run.json"]
    remove(join(base, "run.json"))
    remove(join(base, "run.json"))  # absent: nothing
    remove_tree(join(base, "bc"))
    remove_tree(join(base, "bc"))
    assert not exists(join(base, "bc")) and list_names(base) == ["ray"]
    assert not list(tmp_path.rglob(".*.tmp")), "no temporaries left"
