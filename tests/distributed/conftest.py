"""Tiny pipeline configs, a real local Ray cluster (`ray start --head`) for the distributed tests, and
a watch on the TCP sockets a running Ray listens on (issue 17: local runs stay local)."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from ray_nodes import RAY_CLI, RayHead, descendants, job_env, start_head, stop_ray_nodes

REPO = Path(__file__).resolve().parents[2]

TINY = {
    "data": {"embedded_train_scenarios": 8, "embedded_heldout_scenarios": 3, "real": ""},
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


def proc_address(hex_addr: str) -> str:
    """An address as /proc/net/tcp{,6} writes it, e.g. 0100007F -> 127.0.0.1."""
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) order
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1 on a dual-stack socket
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _listening_inodes() -> dict[str, tuple[str, int]]:
    """inode -> (address, port) of every listening TCP socket (this network namespace)."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            addr, port = fields[1].split(":")
            out[fields[9]] = (proc_address(addr), int(port, 16))
    return out


def _name(pid: int) -> str:
    """The program (its file name, or the title Ray gives a worker) and its first arguments."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    return " ".join([Path(args[0]).name, *args[1:]]).replace("\n", " ").strip()[:70]


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if b"=" in item)


class SocketWatch:
    """Every listening TCP socket seen, from /proc, in the process trees of Ray runs while they
    work (sample often: workers come and go), and the RAY_AUTH_MODE its GCS and raylets run with."""

    def __init__(self, every_s: float = 1.0):
        self.every_s = every_s  # a sample reads all of /proc: at most one this often
        self.seen: dict[tuple[int, str, int], str] = {}  # (pid, address, port) -> process name
        self.auth: dict[str, set[str]] = {}  # gcs_server / raylet -> the RAY_AUTH_MODE values seen
        self._last = 0.0

    def sample(self, root: int, force: bool = False) -> None:
        if not force and time.monotonic() - self._last < self.every_s:
            return
        self._last = time.monotonic()
        listening = _listening_inodes()
        for pid in descendants(root):
            name = _name(pid)
            if name.split(" ")[0] in ("gcs_server", "raylet"):
                self.auth.setdefault(name.split(" ")[0], set()).add(_environ(pid).get("RAY_AUTH_MODE", "unset"))
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:[") and target[8:-1] in listening:
                    address, port = listening[target[8:-1]]
                    self.seen[(pid, address, port)] = name

    address = staticmethod(proc_address)
    is_loopback = staticmethod(is_loopback)

    def table(self) -> str:
        return "\n".join(f"{addr}:{port}  pid={pid} {name}" for (pid, addr, port), name in sorted(self.seen.items()))

    def assert_local(self, programs: tuple[str, ...], learner: str = "") -> None:
        """Every socket seen listens on loopback, Ray's token authentication is on, and the watch
        saw the run: a socket of each program named (a prefix of its process title) and, for
        `learner`, a process with two or more (its core worker's and its process group's store)."""
        table = self.table()
        assert self.seen, "no listening socket seen"
        names = [name.split(" ")[0] for name in self.seen.values()]
        for expected in programs:
            assert any(n.startswith(expected) for n in names), f"no socket of {expected} seen:\n{table}"
        if learner:
            pids = [pid for (pid, _, _), name in self.seen.items() if name.startswith(learner)]
            assert pids and max(map(pids.count, pids)) >= 2, f"no process group of {learner} seen:\n{table}"
        exposed = [f"{addr}:{port}  pid={pid} {name}" for (pid, addr, port), name in sorted(self.seen.items())
                   if not is_loopback(addr)]
        assert not exposed, "listening beyond loopback:\n" + "\n".join(exposed)
        assert self.auth == {"gcs_server": {"token"}, "raylet": {"token"}}, self.auth


@pytest.fixture
def socket_watch() -> SocketWatch:
    """A new SocketWatch: `.sample(pid)` while a run works, `.assert_local(...)` after."""
    return SocketWatch()


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory) -> RayHead:
    """A real single-node Ray cluster (start_head, 2 CPUs) for the tests' jobs, stopped by killing
    its process group (so other Ray instances on the machine are left alone)."""
    head, proc = start_head(tmp_path_factory.mktemp("ray") / "head.log", num_cpus=2)
    yield head
    stop_ray_nodes(proc)


AWS_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def bucket(moto_s3):
    """A function giving the URI of a fresh prefix in the bucket on moto's S3 server
    (tests/conftest.py). Credentials come from the environment, as on a cluster with an instance
    role (drivers, Ray nodes and the workers they start inherit it)."""
    saved = {k: os.environ.get(k) for k in AWS_KEYS}
    os.environ.update(AWS_KEYS)
    try:
        yield lambda prefix: f"s3://smart-r1/{prefix}?{moto_s3}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def head_sockets() -> SocketWatch:
    """The sockets the tests' Ray head (all its processes) listened on while `submitted` ran."""
    return SocketWatch()


@pytest.fixture(scope="session")
def submitted(ray_head, head_sockets, mlflow_server, tmp_path_factory, tiny_config):
    """The tiny pipeline run once through `ray job submit` (with a learner failure drill in sft):
    (out_dir, completed process). It logs to the real MLflow server of `mlflow_server`."""
    tmp = tmp_path_factory.mktemp("pipeline")
    out = tmp / "run"
    tracking = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server}})
    config = tiny_config(REPO / "pipelines" / f".test_tiny_{os.getpid()}.yaml", out)
    cmd = [*RAY_CLI, "job", "submit", "--working-dir", str(REPO),
           "--runtime-env-json", tracking, "--", "python", "pipelines/sft_rft_sft.py", "--config", f"pipelines/{config.name}",
           "--inject-learner-failure", "sft:1"]
    stdout, stderr = tmp / "submit.out", tmp / "submit.err"
    try:
        with open(stdout, "w") as o, open(stderr, "w") as e:
            proc = subprocess.Popen(cmd, env=job_env(ray_head.address), stdout=o, stderr=e, text=True)
            deadline = time.time() + 1500
            while proc.poll() is None:  # the head's sockets, while the job's processes come and go
                head_sockets.sample(ray_head.pid)
                if time.time() > deadline:
                    proc.kill()
                    raise subprocess.TimeoutExpired(cmd, 1500)
                time.sleep(0.2)
    finally:
        config.unlink()
    errors = stderr.read_text() + (f"\n{ray_head.state()}" if proc.returncode else "")
    return out, subprocess.CompletedProcess(cmd, proc.returncode, stdout.read_text(), errors)
