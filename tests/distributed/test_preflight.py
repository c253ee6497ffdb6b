"""The preflight's verdict and the checks one process runs, without Ray (the preflight on a
cluster of isolated nodes is in test_multinode.py)."""

from __future__ import annotations

import torch

from smart_r1.cli import main
from smart_r1.distributed.preflight import (BLOCKER, OK, WARN, ProbeSpec, Row, compact, driver_row,
                                            kernel_module_version, process_checks, table, verdict)


def test_a_blocker_gives_a_non_zero_exit_and_is_named():
    rows = [Row("driver", "n1", "MLflow", "http://x answers"),
            Row("learner 0", "n2", "CUDA", "not available: the run gives this process a GPU", BLOCKER),
            Row("rollout actor 0", "n3", "precision", "emulated", WARN)]
    code, line = verdict(rows)
    assert code == 1 and "BLOCKED" in line and "learner 0: CUDA" in line and "MLflow" not in line
    code, line = verdict([r for r in rows if r.status != BLOCKER])
    assert code == 0 and line.startswith("preflight: READY") and "rollout actor 0: precision" in line
    assert "| learner 0 | n2 | CUDA | not available: the run gives this process a GPU | BLOCKER |" in table(rows)


def test_identical_rows_of_several_processes_are_printed_once():
    rows = [Row(f"rollout actor {i}", f"node{i % 2}", "torch", "2.13.0") for i in range(3)]
    rows.append(Row("rollout actor 3", "node1", "torch", "2.12.0", WARN))
    merged = compact(rows)
    assert merged[0] == Row("rollout actor 0, 1, 2", "2 nodes", "torch", "2.13.0")
    assert merged[1] == rows[3]


def test_the_driver_against_the_torch_build():
    check, value, status = driver_row("13.0", "550.54.15", want_gpu=True)  # a CUDA 12.4 image's R550
    assert status == BLOCKER and "550.54.15 < 580.65.06" in value
    assert driver_row("13.0", "580.82.07", want_gpu=True)[2] == OK
    assert driver_row("12.8", "525.60.13", want_gpu=True)[2] == OK
    assert driver_row("13.0", "", want_gpu=True)[2] == BLOCKER  # no driver on a GPU process's node
    assert driver_row(None, "", want_gpu=False)[2] == OK  # a CPU build on a CPU process
    assert kernel_module_version("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 "
                                 "22:23:56 UTC 2024\nGCC version:  gcc version 12.3.0") == "550.54.15"
    assert kernel_module_version("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  "
                                 "Release Build  (dvs-builder@U16-I3-B03-4-3)") == "580.65.06"


def test_the_gpu_rows_follow_the_config(tmp_path):
    """On this machine (with or without CUDA): a process the run gives a GPU blocks where CUDA is
    not usable; one without a GPU is fine either way."""
    spec = ProbeSpec(role="learner", want_gpu=True, precision="float32", roots=(str(tmp_path),))
    rows = {check: (value, status) for check, value, status in process_checks(spec)}
    usable = torch.cuda.is_available()
    assert rows["CUDA"][1] == (OK if usable else BLOCKER)
    assert rows["storage"] == (f"{tmp_path}: write, read, delete", OK)
    assert rows["precision"][0].startswith("model.precision float32 -> float32/")
    cpu = {check: status for check, _, status in process_checks(ProbeSpec("rollout actor", False, "auto", ()))}
    assert cpu["CUDA"] == OK and cpu["NVIDIA driver"] in (OK, WARN)


def test_unreadable_storage_and_data_block(tmp_path):
    spec = ProbeSpec(role="rollout actor", want_gpu=False, precision="auto", roots=(str(tmp_path),),
                     token=(str(tmp_path / "driver-token"), b"abc"), datasets=(("train", str(tmp_path / "none")),))
    rows = {check: (value, status) for check, value, status in process_checks(spec)}
    assert rows["storage shared"][1] == BLOCKER and "not shared with the driver" in rows["storage shared"][0]
    assert rows["data train"][1] == BLOCKER


def test_an_invalid_config_fails_before_any_cluster_work(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("stages: [{name: rft, kind: mpo, alpha: 1.5}]\n")
    assert main(["preflight", "--config", str(config)]) == 2
    assert "alpha" in capsys.readouterr().err


def test_free_memory_against_the_estimate(tmp_path):
    """Below the estimated peak a CPU process is warned (the estimate is WOMD's largest scenes; a
    CPU run is mostly a development run on smaller ones), far above it fine."""
    from smart_r1.distributed.preflight import free_memory_bytes, memory_row

    free = free_memory_bytes(torch.device("cpu"))
    assert free > 0
    assert memory_row(torch.device("cpu"), free // 4)[2] == OK
    check, value, status = memory_row(torch.device("cpu"), free * 4)
    assert status == WARN and "estimated peak" in value
