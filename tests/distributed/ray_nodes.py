"""Ray nodes for the distributed tests: `ray start` in a process group of its own (optionally in
a mount namespace of its own), stopped with every process below it; a head whose Jobs API answers;
the environment a job client needs."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from smart_r1.ray_runtime import LOOPBACK_ENV


def descendants(root: int) -> set[int]:
    """root and every process below it (Ray's daemons are children of the process that starts Ray,
    its workers children of the raylet)."""
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


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


RAY = Path(sys.executable).parent / "ray"
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]  # `ray ...` of this interpreter


def job_env(address: str) -> dict:
    # Ray 2.59+ turns token authentication on for local clusters; the job client sends the
    # token from ~/.ray/auth_token when RAY_AUTH_MODE=token.
    return {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}


def start_ray_node(args: list[str], log: Path, env: dict, hide: tuple[Path, ...] = ()) -> subprocess.Popen:
    """`ray start --block ARGS` in a process group of its own (stop_ray_nodes ends it and every
    process below it). With `hide`: in a mount namespace of its own (`unshare -m`, private
    propagation, so nothing mounted there reaches this one) where each of those folders is an
    empty tmpfs: the node's processes cannot see what the rest of the machine has in them."""
    cmd = [str(RAY), "start", "--block", *args]
    if hide:
        mounts = " && ".join(f"mount -t tmpfs -o size=16m smr1-hidden {shlex.quote(str(p))}" for p in hide)
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh", *cmd]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _started(pid: int) -> str:
    """A process's start time (field 22 of /proc/PID/stat): with its pid, who it is (pids are reused)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return ""


def stop_ray_nodes(*procs: subprocess.Popen) -> None:
    """SIGTERM to each node's process group (`ray start --block` stops its daemons; the nodes stop
    side by side), then SIGKILL to whatever of their trees is left, as found before the stop (a
    process that left the group or outlived its parent is no longer below it). A node's mount
    namespace ends with its last process."""
    trees = [{pid: _started(pid) for pid in descendants(proc.pid)} for proc in procs]
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 5  # a test's node has nothing to save: a short grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    for proc, tree in zip(procs, trees):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _kill_tree(tree)
        proc.wait()


def _kill_tree(tree: dict[int, str]) -> None:
    """SIGKILL to each pid of `tree` ({pid: its start time}) that is still the same process."""
    for pid, started in tree.items():
        if started and _started(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def kill_ray_node(proc: subprocess.Popen) -> None:
    """Take a node away at once, as a cloud provider takes spot capacity back: SIGKILL to every
    process of its tree (its raylet, agents and workers; no drain, nothing saved), then reap it."""
    _kill_tree({pid: _started(pid) for pid in descendants(proc.pid)})
    proc.wait()


def raylet_node_id(proc: subprocess.Popen) -> str:
    """The Ray node id of a `ray start` process (its raylet's `--node_id`), '' before the raylet runs."""
    for pid in descendants(proc.pid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if Path(args[0]).name == "raylet":
            return next((a.split("=", 1)[1] for a in args if a.startswith("--node_id=")), "")
    return ""


@dataclass(frozen=True)
class RayHead:
    address: str  # the dashboard's: where `ray job submit` goes
    pid: int  # `ray start --block`: every process of the cluster is below it
    log: Path  # its output
    gcs: str = ""  # host:port, what `ray start --address` joins
    temp: Path = Path()  # its Ray temp folder (sessions, logs, the jobs' working folders)

    def state(self) -> str:
        """Whether it still runs, and the end of its log (for a failed job's message)."""
        try:
            alive = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            alive = False
        return f"the tests' Ray head (pid {self.pid}) {'runs' if alive else 'has exited'}; its log ends:\n" \
               + self.log.read_text()[-3000:]


def start_head(log: Path, num_cpus: int, env: dict | None = None, args: tuple[str, ...] = (),
               loopback: bool = True) -> tuple[RayHead, subprocess.Popen]:
    """A Ray head (`ray start --head --block`, dashboard and Jobs API on free ports of 127.0.0.1),
    returned once its Jobs API answers. loopback: as ensure_ray's local runs, node IP 127.0.0.1
    (ray_runtime.LOOPBACK_ENV), so every Ray server, job and worker of it listens on 127.0.0.1 and
    no other node can join; else the node IP is this machine's address, where `ray start --address`
    nodes join it (Ray gives them that address even when told 127.0.0.1)."""
    temp = Path("/tmp") / f"smr1-{os.getpid()}-{log.parent.name}"  # Ray's socket paths must stay short
    gcs, dash, agent_http, agent_grpc, metrics, client = free_ports(6)
    cmd = ["--head", f"--port={gcs}", f"--dashboard-port={dash}", "--include-dashboard=true",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
           f"--num-cpus={num_cpus}", f"--temp-dir={temp}", *args]
    # Jobs run `python ...` with the head's PATH: put this interpreter's bin folder first, so
    # jobs get the same environment even when the venv is not activated (as under `make test`).
    head_env = {**(env or os.environ), **(LOOPBACK_ENV if loopback else {}),
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = start_ray_node(cmd, log, head_env)
    head = RayHead(f"http://127.0.0.1:{dash}", proc.pid, log, f"127.0.0.1:{gcs}", temp)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {proc.returncode}: {head.state()}")
        probe = subprocess.run([str(RAY), "job", "list"], env=job_env(head.address), capture_output=True, text=True)
        if probe.returncode == 0:
            return head, proc
        time.sleep(2)
    stop_ray_nodes(proc)
    raise RuntimeError(f"the local Ray head did not answer within 180 s: {head.state()}")
