"""Shared test fixtures: the real WOMD scenario from ../shared and the official evaluator's env."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# glibc reads MALLOC_* at process start, so for this process they come from the Makefile's
# exports (`make test`); set here they still reach the Ray workers and subprocesses that run the
# official evaluator (2x faster when glibc keeps TensorFlow's big buffers). Also quiets TF.
for _k, _v in {
    "MALLOC_MMAP_THRESHOLD_": "17179869184",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
    "MALLOC_TOP_PAD_": "1073741824",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "RAY_DEDUP_LOGS": "0",
}.items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[1]
SHARED_SCENARIO = REPO.parent / "shared" / "womd" / "motion_data_one_scenario.tfrecord"


@pytest.fixture(scope="session")
def womd_path() -> Path:
    """The real WOMD scenario 637f20cafde22ff8 shipped beside the checkout."""
    if not SHARED_SCENARIO.exists():
        pytest.skip(f"real WOMD scenario not found at {SHARED_SCENARIO}")
    return SHARED_SCENARIO


@pytest.fixture(scope="session")
def womd_record(womd_path):
    from smart_r1.data.womd import read_scenarios

    return next(read_scenarios(womd_path))


@pytest.fixture(scope="session")
def sumo_tfrecords(tmp_path_factory) -> Path:
    """Six generated SUMO scenarios (seed 11, short windows) in two TFRecord files of three,
    made once per session (~20 s)."""
    from smart_r1.data.sumo import SumoConfig, make_dataset

    out = tmp_path_factory.mktemp("sumo_small")
    make_dataset(out, 6, seed=11, scenarios_per_file=3, config=SumoConfig(warmup_seconds=30.0, record_seconds=20.0))
    return out


def _assert_same_scene(a, b) -> None:
    import dataclasses

    import torch
    from smart_r1.tokens.scene import SceneBatch

    for f in dataclasses.fields(SceneBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "scenario_id":
            assert x == y
        else:
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f.name


@pytest.fixture(scope="session")
def assert_same_scene():
    """assert_same_scene(a, b): two SceneBatches equal field for field (dtype, shape, values)."""
    return _assert_same_scene


@pytest.fixture(scope="session")
def sumo_shards(sumo_tfrecords, tmp_path_factory) -> Path:
    """`sumo_tfrecords` as two Parquet shards (converted in this process, without Ray)."""
    from smart_r1.data.preprocess import convert_file

    out = tmp_path_factory.mktemp("sumo_small_parquet")
    for path in sorted(sumo_tfrecords.glob("*.tfrecord")):
        assert not convert_file(str(path), str(out)).bad
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    log = open(root / "server.log", "w")
    # no job runner: MLflow 3 would start about ten huey worker processes the tests never use
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not start within 120 s")
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def moto_s3() -> str:
    """moto's S3 server (a subprocess on 127.0.0.1) holding a bucket `smart-r1`; yields the URI
    query that reaches it (endpoint, scheme, region), e.g. f"s3://smart-r1/key?{moto_s3}"."""
    import pyarrow.fs as pafs

    server = Path(sys.executable).with_name("moto_server")
    if not server.exists():
        pytest.skip("moto[server] is not installed (pip install -e .[test])")
    port = _free_port()
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("moto_server did not start")
                time.sleep(0.2)
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        fs, _ = pafs.FileSystem.from_uri(f"s3://testing:testing@smart-r1?{query}&allow_bucket_creation=true")
        fs.create_dir("smart-r1")
        yield query
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def float32_forward():
    """Forward passes in float32 for a whole module, whatever the processor. The tests that
    check an identity (a loss is the stated sum, a padded batch equals its scenes, two forms
    of attention agree) need float32's precision; on a CPU or GPU with native bf16 the default
    `auto` precision would compute them in bfloat16, whose ~4e-3 relative rounding is above
    their tolerances. tests/model/test_precision.py checks bfloat16 against float32 itself."""
    from smart_r1.model import precision

    with precision.using("float32"):
        yield
