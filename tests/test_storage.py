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


def test_log_rows_of_redone_steps_replace_the_old_ones(tmp_path):
    log = tmp_path / "train_log.jsonl"
    for step in range(4):
        write_log_row(log, {"progress": step, "loss": float(step)})
    truncate_log(log, 2)  # resumed after step 1: steps 2 and 3 are redone
    assert [r["progress"] for r in read_jsonl(log)] == [0, 1]
    write_log_row(log, {"progress": 2, "loss": 20.0})
    write_log_row(log, {"progress": 2, "loss": 21.0})  # logged, crashed before its checkpoint, redone
    assert [(r["progress"], r["loss"]) for r in read_jsonl(log)] == [(0, 0.0), (1, 1.0), (2, 21.0)]
