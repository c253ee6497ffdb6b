"""Tiny pipeline configs and a real local Ray cluster (`ray start --head`) for the distributed tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

TINY = {
    "data": {"embedded_train_scenarios": 8, "embedded_heldout_scenarios": 3, "real_scenario": ""},
    "model": {"preset": "test", "vocab_size": 64},
    "ray": {"num_rollout_workers": 1, "cpus_per_rollout_worker": 1, "num_learners": 1},
    "eval": {"num_rollouts": 2, "max_scenarios": 3},
    "stages": [
        {"name": "bc", "kind": "bc", "epochs": 1, "batch_scenarios": 4},
        {"name": "sft", "kind": "catk_sft", "epochs": 2, "batch_scenarios": 4, "catk_k": 3},
        {"name": "rft", "kind": "mpo", "steps": 3, "num_rollouts": 2, "scenarios_per_step": 2, "lr": 1e-3},
        {"name": "sft_final", "kind": "catk_sft", "epochs": 1, "batch_scenarios": 4},
    ],
}


def write_tiny_config(path: Path, out_dir: Path, **changes) -> Path:
    config = {**TINY, "out_dir": str(out_dir), **changes}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def tiny_config():
    """write_tiny_config(path, out_dir, **changes) -> path of a tiny pipeline YAML."""
    return write_tiny_config


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A real single-node Ray cluster started with `ray start --head --block`, stopped by killing
    its process group (so other Ray instances on the machine are left alone). Yields the
    dashboard (job submission) address."""
    temp = Path("/tmp") / f"smr1-{os.getpid()}"  # Ray's socket paths must stay short
    gcs, dash, agent_http, agent_grpc, metrics, client = _free_ports(6)
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
           f"--port={gcs}", f"--dashboard-port={dash}", "--include-dashboard=true",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
           "--num-cpus=2", f"--temp-dir={temp}"]
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")
    # Jobs run `python ...` with the head's PATH: put this interpreter's bin folder first, so
    # jobs get the same environment even when the venv is not activated (as under `make test`).
    head_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=head_env)
    address = f"http://127.0.0.1:{dash}"
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}
    deadline = time.time() + 180
    while time.time() < deadline:
        probe = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "list"], env=env,
                               capture_output=True, text=True)
        if probe.returncode == 0:
            break
        time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError("the local Ray head did not come up within 180 s")
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _job_env(address: str) -> dict:
    # Ray 2.59+ turns token authentication on for local clusters; the job client sends the
    # token from ~/.ray/auth_token when RAY_AUTH_MODE=token.
    return {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}


@pytest.fixture(scope="session")
def submitted(ray_head, mlflow_server, tmp_path_factory, tiny_config):
    """The tiny pipeline run once through `ray job submit` (with a learner failure drill in sft):
    (out_dir, completed process). It logs to the real MLflow server of `mlflow_server`."""
    tmp = tmp_path_factory.mktemp("pipeline")
    out = tmp / "run"
    tracking = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server}})
    config = tiny_config(REPO / "pipelines" / f".test_tiny_{os.getpid()}.yaml", out)
    try:
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--working-dir", str(REPO),
               "--runtime-env-json", tracking, "--", "python", "pipelines/sft_rft_sft.py", "--config", f"pipelines/{config.name}",
               "--inject-learner-failure", "sft:1"]
        proc = subprocess.run(cmd, env=_job_env(ray_head), capture_output=True, text=True, timeout=1500)
    finally:
        config.unlink()
    return out, proc
