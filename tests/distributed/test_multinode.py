"""A cluster whose nodes share no files, on this machine: a Ray head with `CPU: 0` (nothing but
the job's driver runs there) and two worker nodes, each started inside a mount namespace of its
own where the tests' folders and the head's Ray folder are empty tmpfs mounts; the repository and
its venv stay visible, as an image would be. The run's storage root and its data are a bucket on
moto's S3 server (127.0.0.1), MLflow a tracking server.

`ray job submit` runs the tiny pipeline's BC and RFT: every stage ends with its checkpoint and
metrics in the bucket, although the worker node that runs its learner is taken away (every process
SIGKILLed, as spot capacity goes) in the middle of RFT: Ray Train restarts the learners on the nodes
left and they resume from the stage's last state; a replacement node joins. (BC's learners restart
and resume alike: test_pipeline.py's learner failure drill resumes a supervised stage.) A second
run (another prefix) has its driver killed mid-RFT and is submitted again from another working
folder while the first goes on: it resumes from the bucket, redoing no finished stage, epoch or
step. Before that, a Ray task pinned to each worker node shows it cannot see the driver's folders;
after, Ray's state API shows that the learners and rollout actors ran on the worker nodes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from smart_r1.storage import base_name, exists, join, list_names, read_bytes, read_json, read_jsonl, resolve

from ray_nodes import (RAY_CLI, RayHead, descendants, free_ports, job_env, kill_ray_node, raylet_node_id, start_head,
                       start_ray_node, stop_ray_nodes)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "pipelines" / "sft_rft_sft.py"
OBJECT_STORE = 100 * 1024 * 1024  # bytes per node: the tiny model's weights are a few MB
WORKERS = 2


@dataclass(frozen=True)
class Cluster:
    head: RayHead
    workers: list[str]  # the live worker nodes' Ray node ids (a node taken away leaves the list)
    hidden: tuple[Path, ...]  # folders the worker nodes see as empty tmpfs mounts
    nodes: list[subprocess.Popen]  # the live worker nodes' `ray start --block`, every process below it
    launch_worker: Callable[[], subprocess.Popen]  # one more worker node, started (not yet joined)
    joined: Callable[[subprocess.Popen], str]  # a started worker node's id once it is alive


def _ray_list(head: RayHead, kind: str) -> list[dict]:
    """`ray list nodes|actors` through the head's state API, with details (dead actors too)."""
    proc = subprocess.run([*RAY_CLI, "list", kind, "--detail", "--format", "json", "--limit", "10000"],
                          env=job_env(head.address), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if proc.stdout.startswith("No resource in the cluster"):  # what it prints for none (yet), not JSON
        return []
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def cluster(bucket, tmp_path_factory) -> Cluster:
    """The head (in this machine's namespace, beside the drivers) and WORKERS worker nodes that
    cannot see the tests' folders (the drivers' working folders, every output) nor the head's Ray
    folder (where the job's driver runs). Every node is stopped, and with it its namespace, even
    when the start fails. `bucket` first: the nodes inherit its credentials (an instance role)."""
    logs = tmp_path_factory.mktemp("multinode")
    procs: list[subprocess.Popen] = []  # the head's
    nodes: list[subprocess.Popen] = []  # the live worker nodes' (a node taken away leaves it)
    temps: list[Path] = []
    try:
        # As on a real cluster, the nodes reach each other at this machine's address (Ray gives a
        # `ray start --address` node that address, never loopback), with Ray's token
        # authentication on, as in the cluster configs; the dashboard and Jobs API stay on 127.0.0.1.
        token = {**os.environ, "RAY_AUTH_MODE": "token"}
        head, proc = start_head(logs / "head.log", num_cpus=0, env=token, loopback=False,
                                args=(f"--object-store-memory={OBJECT_STORE}",))
        procs.append(proc)
        temps.append(head.temp)
        hidden = (tmp_path_factory.getbasetemp(), head.temp)
        env = {**token, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

        def launch_worker() -> subprocess.Popen:
            i = len(temps) - 1
            # its own Ray folder, outside the hidden ones: this process can read its logs
            temp = Path(f"{head.temp}-w{i}")
            temps.append(temp)
            ports = free_ports(6)
            args = [f"--address={head.gcs}", "--num-cpus=1",
                    f"--object-store-memory={OBJECT_STORE}", f"--temp-dir={temp}",
                    # several nodes on one machine: every port of its own (as Ray's cluster_utils)
                    "--min-worker-port=0", "--max-worker-port=0", *(
                        f"--{name}={port}" for name, port in zip(
                            ("node-manager-port", "object-manager-port", "metrics-export-port",
                             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port"),
                            ports))]
            nodes.append(start_ray_node(args, logs / f"worker{i}.log", env, hide=hidden))
            return nodes[-1]

        def joined(proc: subprocess.Popen) -> str:
            """The node's id once it is alive. A node that exits while starting (on a loaded
            machine Ray's own 30 s start-up wait can run out) is started again, once."""
            deadline, retried = time.time() + 180, False
            while True:
                node = raylet_node_id(proc)
                if node and any(n["node_id"] == node and n["state"] == "ALIVE" for n in _ray_list(head, "nodes")):
                    return node
                if proc.poll() is not None and not retried:
                    nodes.remove(proc)
                    proc, retried = launch_worker(), True
                assert proc.poll() is None, "a Ray node exited:\n" + "\n".join(
                    f.read_text()[-2000:] for f in sorted(logs.glob("*.log")))
                assert time.time() < deadline, "a worker node did not join in 180 s"
                time.sleep(2)

        workers = [joined(proc) for proc in [launch_worker() for _ in range(WORKERS)]]
        yield Cluster(head, workers, hidden, nodes, launch_worker, joined)
    finally:
        stop_ray_nodes(*procs, *nodes)
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)


# Run by a Ray driver in this machine's namespace (as the job's driver is): the listing of each
# path here and, from a task pinned to each worker node, there; with the node and its mount namespace.
_LOOK = r"""
import json, os, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

def look(paths):
    return {"node": ray.get_runtime_context().get_node_id(), "mnt": os.readlink("/proc/self/ns/mnt"),
            "seen": {p: sorted(os.listdir(p)) if os.path.isdir(p) else None for p in paths}}

paths, workers = json.loads(sys.argv[1]), json.loads(sys.argv[2])
ray.init(address=os.environ["RAY_ADDRESS"], configure_logging=False, log_to_driver=False)
remote = ray.remote(num_cpus=0)(look)
there = ray.get([remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(paths)
                 for node in workers], timeout=300)
print(json.dumps({"driver": look(paths), "workers": there}))
"""


def test_worker_nodes_cannot_see_the_drivers_folders(cluster, tmp_path):
    """No test here can pass through a shared local path: what a driver has in its working folder,
    in any test folder or in the head's Ray folder is absent on every worker node, which still sees
    the repository and its venv (the image)."""
    (tmp_path / "driver_file").write_text("on the driver's disk only")
    paths = [str(p) for p in (*cluster.hidden, tmp_path, REPO / "smart_r1")]
    env = {**job_env(cluster.head.gcs)}
    proc = subprocess.run([sys.executable, "-c", _LOOK, json.dumps(paths), json.dumps(cluster.workers)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    driver, workers = seen["driver"], seen["workers"]
    assert "driver_file" in driver["seen"][str(tmp_path)] and tmp_path.name in os.listdir(tmp_path.parent)
    for path in cluster.hidden:
        assert driver["seen"][str(path)], f"{path} is empty on the driver"
    assert sorted(w["node"] for w in workers) == sorted(cluster.workers)
    assert len({w["mnt"] for w in workers} | {driver["mnt"]}) == WORKERS + 1, "a mount namespace is shared"
    for w in workers:
        for path in cluster.hidden:
            assert w["seen"][str(path)] == [], f"worker node {w['node']} sees {path}: {w['seen'][str(path)]}"
        assert w["seen"][str(tmp_path)] is None, f"worker node {w['node']} sees the driver's folder"
        assert "__init__.py" in w["seen"][str(REPO / "smart_r1")], "the image (the repository) is visible"


def _mtime(uri: str):
    fs, key = resolve(uri)
    return fs.get_file_info(key).mtime


def _submit(head: RayHead, cwd: Path, sid: str, argv: list[str], env_vars: dict) -> subprocess.Popen:
    """`ray job submit` of the pipeline from the driver's working folder `cwd` (uploaded as the
    job's working folder: its config), following the job until it ends."""
    cmd = [*RAY_CLI, "job", "submit", "--submission-id", sid, "--working-dir", ".",
           "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", "python", str(SCRIPT), *argv]
    return subprocess.Popen(cmd, cwd=cwd, env=job_env(head.address), stdout=open(cwd.parent / f"{sid}.submit", "w"),
                            stderr=subprocess.STDOUT)


def _driver_log(head: RayHead, sid: str) -> str:
    """The job's driver output, from the head's Ray folder (all of it, unlike a followed submit);
    also copied beside the nodes' logs, which outlive the cluster."""
    path = head.temp / "session_latest" / "logs" / f"job-driver-{sid}.log"
    text = path.read_text() if path.exists() else ""
    (head.log.parent / f"job-{sid}.log").write_text(text)
    return text


def _kill_driver(head: RayHead, out: str) -> None:
    """SIGKILL the pipeline's driver of the job writing to `out` (a process on the head, below its
    job supervisor), as a crash of the driver's machine would end it."""
    drivers = []
    for pid in descendants(head.pid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if str(SCRIPT) in args and out in args:  # python itself, not the shell that started it
            drivers.append(pid)
    assert len(drivers) == 1, drivers
    os.kill(drivers[0], signal.SIGKILL)


def _wait(proc: subprocess.Popen, head: RayHead, sid: str, timeout_s: float = 900) -> str:
    started = time.time()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        subprocess.run([*RAY_CLI, "job", "stop", sid], env=job_env(head.address), capture_output=True)
        proc.kill()
        pytest.fail(f"job {sid} did not end in {timeout_s:.0f} s:\n{_driver_log(head, sid)[-4000:]}")
    log = _driver_log(head, sid)
    assert proc.returncode == 0, f"job {sid} failed:\n{log[-4000:]}\n{head.state()}"
    print(f"job {sid}: {time.time() - started:.0f} s", flush=True)
    return log


def _check_finished(out: str, bc_epochs: int, rft_steps: int) -> None:
    """Every stage with its checkpoint, metrics, scores and logs (each unit once) in the bucket."""
    from smart_r1.model.checkpoint import load_checkpoint

    for stage, units in (("bc", bc_epochs), ("rft", rft_steps)):
        assert read_json(join(out, stage, "done.json"))["checkpoint"] == "model.pt"
        assert read_json(join(out, stage, "metrics.json"))["heldout"]["scenarios"] == 1
        assert len(read_json(join(out, stage, "scores_heldout.json"))["records"]) == 1
        assert [r["progress"] for r in read_jsonl(join(out, stage, "train_log.jsonl"))] == list(range(units)), stage
        load_checkpoint(read_bytes(join(out, stage, "model.pt")))  # whole and CRC-clean
        assert exists(join(out, stage, "last_state.pt")) and exists(join(out, stage, "rollout.png"))
    assert [r["progress"] for r in read_jsonl(join(out, "rft", "rollouts.jsonl"))] == list(range(rft_steps))
    assert read_json(join(out, "rft", "alpha.json"))["auto"] is True
    # model.precision (float32; `auto` is bfloat16 on a CPU with AVX512-BF16) reached the learners
    # and the rollout actors on the worker nodes in their stage's spec: each records what it ran
    for stage in ("bc", "rft"):
        assert {r["numerics"] for r in read_jsonl(join(out, stage, "train_log.jsonl"))} == {"float32/cpu"}, stage
    assert {r["actor_numerics"] for r in read_jsonl(join(out, "rft", "train_log.jsonl"))} == {"float32/cpu"}
    assert list(read_json(join(out, "results.json"))) == ["bc", "rft"]
    for name in ("config.json", "run.json", "init.pt", "mlflow_run_id", "results.md"):
        assert exists(join(out, name)), name
    runs = list_names(join(out, "ray"))  # Ray Train's storage, in the root: <run>-<stage>-<fingerprint>
    assert any(n.startswith(f"{base_name(out)}-rft-") for n in runs), runs


RUN_VAR = "SMR1_TEST_RUN"  # in each job's runtime env: which run a Ray worker process belongs to


def _in_the_middle(out: str, stage: str) -> bool:
    """The stage has saved a state (its log's rows come with it) and is not finished."""
    rows = read_jsonl(join(out, stage, "train_log.jsonl"))
    return bool(rows) and exists(join(out, stage, "last_state.pt")) and not exists(join(out, stage, "done.json"))


def _host(cluster: Cluster, run: str, title: str) -> subprocess.Popen | None:
    """The worker node running a process of job `run` whose title starts with `title`."""
    for node in cluster.nodes:
        for pid in descendants(node.pid):
            try:
                name = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if name.startswith(title) and f"{RUN_VAR}={run}".encode() in env:
                return node
    return None


def _take_away(cluster: Cluster, node: subprocess.Popen) -> None:
    """The node is gone as spot capacity goes (every process SIGKILLed) and a replacement is started."""
    lost = raylet_node_id(node)
    kill_ray_node(node)
    cluster.nodes.remove(node)
    if lost in cluster.workers:  # else a replacement that had not been counted yet
        cluster.workers.remove(lost)
    cluster.launch_worker()
    print(f"worker node {lost[:8]} taken away; a replacement is starting", flush=True)


def test_pipeline_keeps_its_state_in_the_bucket_and_resumes_from_another_folder(cluster, bucket, mlflow_server,
                                                                                womd_record, tmp_path):
    from mlflow.tracking import MlflowClient

    from smart_r1.data.parquet import write_shard
    from smart_r1.distributed.worker_kit import read_last_state

    head = cluster.head
    # the data in the bucket too (the real WOMD scenario as one shard)
    data = bucket("multinode/data")
    write_shard(join(data, "one.parquet"), [womd_record])
    # pipelines/tiny.yaml's BC and RFT stages, one batch per epoch, one scenario a step, a state
    # saved every RL step; half a CPU a learner or rollout actor, so two runs fit the two one-CPU
    # worker nodes side by side
    config = yaml.safe_load((REPO / "pipelines" / "tiny.yaml").read_text())
    config["stages"] = [s for s in config["stages"] if s["name"] in ("bc", "rft")]
    argv = ["--config", "tiny.yaml", "--set", f"data.train={data}", "--set", f"data.heldout={data}",
            "--set", "eval.num_rollouts=2", "--set", "bc.steps_per_epoch=1", "--set", "rft.checkpoint_every=1",
            "--set", "rft.scenarios_per_step=1", "--set", "rft.num_rollouts=2", "--set", "rft.alpha=auto",
            "--set", "model.precision=float32"]
    folders = {}
    for name in ("first", "second", "third"):  # the drivers' working folders: their config only
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / "tiny.yaml").write_text(yaml.safe_dump(config))

    def env_vars(run: str) -> dict:
        return {"MLFLOW_TRACKING_URI": mlflow_server, RUN_VAR: run}

    # one run to its end, whose learner's worker node is taken away in the middle of RFT, and
    # beside it another (its own prefix) whose driver is killed during RFT, as soon as its first
    # step's state is in the bucket ...
    whole, out = bucket("multinode/whole"), bucket("multinode/resumed")
    ever = set(cluster.workers)  # every worker node the runs had
    first = _submit(head, folders["first"], "whole",
                    [*argv, "--out-dir", whole, "--set", "rft.steps=3"], env_vars("whole"))
    argv = [*argv, "--out-dir", out, "--set", "rft.steps=2"]
    proc = _submit(head, folders["second"], "killed", argv, env_vars("killed"))
    pending = {"whole rft": (whole, "rft"), "killed rft": (out, "rft")}
    deadline = time.time() + 900
    while pending:
        for node in [n for n in cluster.nodes if n.poll() is not None]:  # a replacement that failed to start
            cluster.nodes.remove(node)
            cluster.launch_worker()
        for event, (root, stage) in list(pending.items()):
            if not _in_the_middle(root, stage):
                continue
            if event == "killed rft":
                _kill_driver(head, out)
                del pending[event]
                continue
            if not all(raylet_node_id(n) for n in cluster.nodes):
                continue  # a replacement is still starting: never take the last worker node away
            node = _host(cluster, "whole", "ray::RayTrainWorker")  # the learner's node
            if node is not None:
                ever.add(raylet_node_id(node))
                _take_away(cluster, node)
                del pending[event]
        assert first.poll() is None, f"the whole run ended with {sorted(pending)} to come:\n" \
                                     f"{_driver_log(head, 'whole')[-4000:]}"
        assert proc.poll() is None or "killed rft" not in pending, \
            f"the job ended before RFT:\n{_driver_log(head, 'killed')[-4000:]}"
        assert time.time() < deadline, f"{sorted(pending)} not reached in time:\n{_driver_log(head, 'whole')[-4000:]}"
        time.sleep(0.3)
    proc.wait(timeout=120)  # the job has failed
    assert not exists(join(out, "rft", "done.json"))
    # the learner outlives its driver by a moment and may save another step before Ray ends it
    gone_by = time.time() + 120
    while _host(cluster, "killed", "ray::RayTrainWorker") is not None:
        assert time.time() < gone_by, "the killed driver's learner lives on"
        time.sleep(0.5)
    saved = int(read_last_state(join(out, "rft"))["progress"])
    finished = _mtime(join(out, "bc", "model.pt"))

    # ... and submitted again from another working folder (beside the rest of the whole run): it
    # resumes from the bucket
    resubmitted = _submit(head, folders["third"], "resumed", argv, env_vars("resumed"))
    log = _wait(first, head, "whole")
    _check_finished(whole, bc_epochs=1, rft_steps=3)
    # the learners lost with their node were restarted by Ray Train on the nodes left and resumed
    # from the stage's last state (in the same job: no resubmission)
    assert "[rft] resuming after step" in log, log[-4000:]
    text = _driver_log(head, "killed") + _wait(resubmitted, head, "resumed")
    cluster.workers.extend(cluster.joined(node) for node in list(cluster.nodes) if raylet_node_id(node) not in ever)
    ever.update(cluster.workers)
    assert len(cluster.workers) == WORKERS, "the replacements joined"
    _check_finished(out, bc_epochs=1, rft_steps=2)
    resumed = _driver_log(head, "resumed")
    assert "[bc] already finished" in resumed and text.count("[bc] bc from") == 1
    assert _mtime(join(out, "bc", "model.pt")) == finished, "BC was redone"
    assert f"[rft] resuming after step {saved}" in resumed, resumed[-4000:]
    assert text.count("[init] vocabulary") == 1, "init.pt was remade"

    # nothing on the drivers' disks: their working folders and the jobs' copies of them on the head
    # hold the config only
    for folder in folders.values():
        assert sorted(p.name for p in folder.iterdir()) == ["tiny.yaml"], folder
    copies = [p for p in (head.temp / "session_latest" / "runtime_resources" / "working_dir_files").iterdir()
              if p.is_dir()]  # beside each: its zip's lock file
    assert copies and all(sorted(p.name for p in c.iterdir()) == ["tiny.yaml"] for c in copies), copies

    # one MLflow run across both submissions, its stages nested under it
    client = MlflowClient(mlflow_server)
    run_id = read_bytes(join(out, "mlflow_run_id")).decode().strip()
    assert client.get_run(run_id).info.status == "FINISHED"
    children = client.search_runs([client.get_run(run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    assert {r.info.run_name for r in children} == {"bc", "rft"}

    # the learners and rollout actors of all three jobs ran on the worker nodes (the ones taken
    # away and their replacements), never the head
    actors = [a for a in _ray_list(head, "actors") if a["class_name"] in ("RolloutWorker", "RayTrainWorker")]
    kinds = {a["class_name"] for a in actors}
    assert kinds == {"RolloutWorker", "RayTrainWorker"}, kinds
    nodes = {a["node_id"] for a in actors}
    assert nodes and nodes <= ever, (nodes, ever)
    print(f"learners and rollout actors on {len(nodes)} worker nodes, {len(ever) - WORKERS} of them replacements",
          flush=True)


def _preflight_rows(log: str) -> list[list[str]]:
    """The rows of the preflight's table: [process, node, check, found, status]."""
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in log.splitlines()
             if line.startswith("| ") and not line.startswith("| process ")]
    return [c for c in cells if len(c) == 5]


def test_preflight_checks_every_process_kind_where_the_run_will_put_it(cluster, bucket, mlflow_server,
                                                                        womd_record, tmp_path):
    """`smart-r1 preflight`, submitted as the pipeline is: its learner probes (a Ray Train group
    of two, as the stages build it) and rollout actor probe run on the worker nodes, where they
    read the data and the driver's file in the bucket, reach MLflow, all-reduce over gloo and
    resolve the configured precision; the verdict is READY. The same config asking for a GPU
    per learner, on this cluster without any, is BLOCKED, with a non-zero exit."""
    from smart_r1.data.parquet import write_shard

    data = bucket("multinode/preflight-data")
    write_shard(join(data, "one.parquet"), [womd_record])
    (tmp_path / "tiny.yaml").write_text((REPO / "pipelines" / "tiny.yaml").read_text())
    argv = ["--config", "tiny.yaml", "--out-dir", bucket("multinode/preflight"), "--set", f"data.train={data}",
            "--set", f"data.heldout={data}", "--set", "model.precision=float32", "--set", "ray.num_learners=2"]

    def preflight(sid: str, *more: str) -> tuple[int, str]:
        cmd = [*RAY_CLI, "job", "submit", "--submission-id", sid, "--working-dir", ".", "--runtime-env-json",
               json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server}}), "--", "smart-r1", "preflight",
               *argv, *more]
        proc = subprocess.run(cmd, cwd=tmp_path, env=job_env(cluster.head.address), capture_output=True, text=True,
                              timeout=900)
        return proc.returncode, _driver_log(cluster.head, sid)

    started = time.time()
    code, log = preflight("preflight-ready", "--timeout-s", "300")
    print(f"preflight: {time.time() - started:.0f} s", flush=True)
    assert code == 0 and "preflight: READY" in log, log[-4000:]
    rows = _preflight_rows(log)
    assert rows and all(r[4] in ("ok", "warn") for r in rows), log[-4000:]
    workers = {node[:8] for node in cluster.workers}
    found = {}
    for process, node, check, value, _ in rows:
        kind = "learner" if process.startswith("learner") else "actor" if process.startswith("rollout actor") else ""
        if kind:
            found.setdefault((kind, check), []).append(value)
            assert {n for n in workers if n in node} or node.endswith("nodes"), (process, node, workers)
    for kind in ("learner", "actor"):
        assert found[(kind, "precision")] == ["model.precision float32 -> float32/cpu"], found
        assert found[(kind, "CUDA")] == ["not available (the run uses no GPU here)"]
        assert all("1 scenarios" in v for v in found[(kind, "data train")] + found[(kind, "data heldout")])
        assert all(v.startswith("reads the driver's s3://smart-r1/multinode/preflight/") for v in
                   found[(kind, "storage shared")])
    assert found[("learner", "MLflow")] == [f"{mlflow_server} answers"]
    (reduced,) = found[("learner", "all-reduce")]
    assert reduced.startswith("2 ranks over gloo on cpu: 3 (expected 3)"), reduced

    code, log = preflight("preflight-gpu", "--set", "ray.use_gpu=true", "--timeout-s", "10")
    assert code != 0 and "preflight: BLOCKED" in log and "learners: placement" in log, log[-4000:]
