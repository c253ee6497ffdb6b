"""Local runs stay local (issue 17): while a local run works (Ray started by `ensure_ray` as the
pipeline starts it, a Ray actor, a Ray Train learner with its torch.distributed process group),
every TCP socket its processes listen on is bound to loopback, and Ray's token authentication is
on in the processes Ray started."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

# The driver: what the pipeline does (ensure_ray, actors, run_learner's torch_config), held open
# by the learner until the test has looked.
DRIVER = """
import sys, time
from pathlib import Path

import ray
import torch
import torch.distributed as dist
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from smart_r1.distributed.learner import torch_config
from smart_r1.ray_runtime import ensure_ray

here = Path(sys.argv[1])


def loop(config):
    t = torch.ones(1)
    dist.all_reduce(t)  # the process group is up
    (here / "ready").touch()
    deadline = time.time() + 120
    while not (here / "release").exists() and time.time() < deadline:
        time.sleep(0.2)


@ray.remote(num_cpus=0)
class Actor:
    def ping(self):
        return "pong"


ensure_ray(num_cpus=2)
actor = Actor.remote()
assert ray.get(actor.ping.remote()) == "pong"
TorchTrainer(loop, torch_config=torch_config(),
             scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
             run_config=RunConfig(name="binding", storage_path=str(here / "storage"))).fit()
"""


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def _address(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) order
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


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
            out[fields[9]] = (_address(addr), int(port, 16))
    return out


def _name(pid: int) -> str:
    """The program (its file name, or the title Ray gives a worker) and its first arguments."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    return " ".join([Path(args[0]).name, *args[1:]]).replace("\n", " ").strip()[:70]


def listening_sockets(root: int) -> dict[tuple[int, str, int], str]:
    """(pid, address, port) -> process name, for every listening TCP socket of root's process tree."""
    listening = _listening_inodes()
    found = {}
    for pid in _descendants(root):
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
                found[(pid, address, port)] = _name(pid)
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1 on a dual-stack socket
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if b"=" in item)


def test_loopback_helpers():
    assert _address("0100007F") == "127.0.0.1"
    assert _address("0000000000000000FFFF00000100007F") == "::ffff:127.0.0.1"
    assert _address("00000000000000000000000001000000") == "::1"
    assert [_is_loopback(a) for a in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "0.0.0.0", "::", "192.0.2.2")] \
        == [True, True, True, False, False, False]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_local_run_listens_on_loopback_only_with_token_auth(tmp_path):
    # a local run as `make run` starts it: no cluster to join, Ray's own default for token auth
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[tuple[int, str, int], str] = {}
    auth: dict[str, str] = {}
    tail = lambda: (tmp_path / "driver.log").read_text()[-3000:]  # noqa: E731
    try:
        deadline = time.time() + 240
        while not (tmp_path / "ready").exists():  # collect while Ray, the actor, the learner start
            assert proc.poll() is None, "driver exited early:\n" + tail()
            assert time.time() < deadline, "the learner never started:\n" + tail()
            seen.update(listening_sockets(proc.pid))
            time.sleep(0.25)
        for _ in range(8):  # the learner is in its loop: everything is up
            seen.update(listening_sockets(proc.pid))
            time.sleep(0.25)
        for pid in _descendants(proc.pid):
            name = _name(pid).split(" ")[0]
            if name in ("gcs_server", "raylet"):
                auth[name] = _environ(pid).get("RAY_AUTH_MODE", "unset")
    finally:
        (tmp_path / "release").touch()
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert proc.returncode == 0, tail()

    table = "\n".join(f"{addr}:{port}  pid={pid} {name}" for (pid, addr, port), name in sorted(seen.items()))
    print("listening sockets of the run:\n" + table)
    programs = [name.split(" ")[0] for name in seen.values()]
    # the test saw the run: Ray's daemons, the actor, and the learner's worker with its own
    # socket (core worker) and the process group's (its store, gloo's)
    for expected in ("gcs_server", "raylet", "ray::Actor", "ray::RayTrainWorker"):
        assert any(p.startswith(expected) for p in programs), f"no socket of {expected} seen:\n{table}"
    learner = [pid for (pid, _, _), name in seen.items() if name.startswith("ray::RayTrainWorker")]
    assert max(learner.count(pid) for pid in learner) >= 2, f"no process group seen:\n{table}"
    exposed = [f"{addr}:{port}  pid={pid} {name}" for (pid, addr, port), name in sorted(seen.items())
               if not _is_loopback(addr)]
    assert not exposed, "listening beyond loopback:\n" + "\n".join(exposed)
    assert auth == {"gcs_server": "token", "raylet": "token"}, auth
