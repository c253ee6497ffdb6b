"""`smart-r1 preflight`: what would stop a run hours in, checked in minutes before it starts, on
every kind of process the run will use, printed as one table with a verdict.

    smart-r1 preflight --config pipelines/womd_gpu.yaml --set data.train=s3://bucket/womd/train
    ray job submit --working-dir . -- smart-r1 preflight --config pipelines/womd_gpu.yaml

Where each check runs (every row says where, what was found, and ok / warn / BLOCKER):
    driver          the run folder's identity (a folder of another config is refused), Ray's
                    resources against the run's, MLflow's store against the cluster and its
                    server, a file written to each storage root (out_dir, ray.storage_path)
    learners        a Ray Train TorchTrainer built as the stages build it (`learner_scaling`,
                    `torch_config`: ray.num_learners workers, use_gpu, cpus_per_learner, the same
                    process group), so its workers land where the learners will; on each rank the
                    process rows below, then an all-reduce between the ranks over the run's
                    backend (gloo on CPU, NCCL on GPU)
    rollout actors  ray.num_rollout_workers actors with the run's CPUs and GPUs per actor; the
                    process rows below
Process rows: torch and its CUDA build, CUDA devices, the NVIDIA driver against the build's
minimum (MIN_DRIVER), bf16, the precision `model.precision` resolves to there, free memory against
the process's estimated peak at WOMD's largest scenes (`memory_estimate.estimate_peak_bytes`; on
a GPU BLOCKER below it, warn below 1.2 times it; on a CPU warn), each
storage root read / written / deleted there (and the driver's file read: the root is shared), the
training and held-out data readable and non-empty, the MLflow server reachable (learners log to
it themselves).

Identical rows of several processes are printed once, naming them all. The exit status is 1 when
any row is a BLOCKER, else 0.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass

import torch

from smart_r1.config import PipelineConfig

OK, WARN, BLOCKER = "ok", "warn", "BLOCKER"

# The oldest Linux driver that runs a CUDA build of each major version (CUDA minor version
# compatibility: a build of any 13.x runs on any driver >= 580, of 12.x on >= 525.60.13, of 11.x
# on >= 450.80.02). NVIDIA, "CUDA Compatibility", docs.nvidia.com/deploy/cuda-compatibility/
# (minor-version-compatibility), and the CUDA Toolkit release notes (13.0 GA ships 580.65.06).
MIN_DRIVER = {11: (450, 80, 2), 12: (525, 60, 13), 13: (580, 65, 6)}
GIB = 1024 ** 3


@dataclass(frozen=True)
class Row:
    """One finding: `process` ("driver", "learner 0", "rollout actor 1") on `node` (its IP and
    the start of its Ray node id), what was checked, what was found, and its status."""

    process: str
    node: str
    check: str
    value: str
    status: str = OK


@dataclass(frozen=True)
class ProbeSpec:
    """What a probe process checks (plain values: it travels to other nodes)."""

    role: str  # "learner" | "rollout actor"
    want_gpu: bool  # the run gives this process a GPU (ray.use_gpu / gpus_per_rollout_worker > 0)
    precision: str  # model.precision
    roots: tuple[str, ...]  # storage roots every process writes to
    token: tuple[str, bytes] = ("", b"")  # a file the driver wrote under roots[0], and its bytes
    datasets: tuple[tuple[str, str], ...] = ()  # (name, path or URI) the run reads from every node
    tracking_uri: str = ""  # where learners log (checked when it is a server)
    estimate_bytes: int = 0  # this process's estimated peak memory (0: no estimate)


# -- checks that run in one process (driver, learner rank or rollout actor) --------------------------

def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def kernel_module_version(text: str) -> str:
    """The driver version in /proc/driver/nvidia/version's text ('NVRM version: NVIDIA UNIX x86_64
    Kernel Module  580.65.06 ...', or '... Open Kernel Module for x86_64  580.65.06 ...'), or ''."""
    found = re.search(r"Kernel Module(?:\s+for\s+\w+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return found.group(1) if found else ""


def driver_version() -> str:
    """The NVIDIA kernel driver's version on this node ('' when there is none)."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            found = kernel_module_version(f.read())
            if found:
                return found
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.split("\n")[0].strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def driver_row(cuda_build: str | None, driver: str, want_gpu: bool) -> tuple[str, str, str]:
    """(check, value, status) of the NVIDIA driver against what the torch build needs."""
    if not cuda_build:
        return "NVIDIA driver", f"{driver or 'none'} (torch is a CPU build: no CUDA)", BLOCKER if want_gpu else OK
    major = parse_version(cuda_build)[0]
    need = MIN_DRIVER.get(major)
    need_text = "{}.{:02d}.{:02d}".format(*need) if need else "?"
    if not driver:
        return "NVIDIA driver", f"none found; torch's CUDA {cuda_build} build needs >= {need_text}", \
            BLOCKER if want_gpu else OK
    if need is None:
        return "NVIDIA driver", f"{driver}; no minimum known for CUDA {cuda_build}", WARN
    fits = parse_version(driver) >= need
    return ("NVIDIA driver", f"{driver} {'>=' if fits else '<'} {need_text}, the minimum for torch's CUDA "
            f"{cuda_build} build", OK if fits else (BLOCKER if want_gpu else WARN))


def free_memory_bytes(device: torch.device) -> int:
    """Free memory where this process's tensors live: the GPU's (mem_get_info) or the node's
    MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_row(device: torch.device, estimate: int) -> tuple[str, str, str]:
    free = free_memory_bytes(device)
    where = "GPU" if device.type == "cuda" else "node"
    if not estimate:
        return "free memory", f"{free / GIB:.1f} GiB on the {where}", OK
    # The estimate is for WOMD's largest scenes: a GPU below it (a WOMD run) blocks; a CPU process,
    # mostly a development run on smaller scenes, is warned
    status = OK if free >= 1.2 * estimate else WARN if free >= estimate or device.type != "cuda" else BLOCKER
    return "free memory", f"{free / GIB:.1f} GiB on the {where}, estimated peak {estimate / GIB:.1f} GiB", status


def storage_rows(spec: ProbeSpec, name: str) -> list[tuple[str, str, str]]:
    """Write, read back and delete a file under each storage root; read the driver's file (a root
    that is not shared with the driver fails here)."""
    from smart_r1.storage import join, read_bytes, remove, write_bytes

    rows = []
    for root in spec.roots:
        path = join(root, ".preflight", f"{name}-{uuid.uuid4().hex[:8]}")
        data = uuid.uuid4().bytes
        try:
            write_bytes(path, data)
            back = read_bytes(path)
            remove(path)
            if back != data:
                raise OSError("read back other bytes than written")
            rows.append(("storage", f"{short(root)}: write, read, delete", OK))
        except Exception as e:
            rows.append(("storage", f"{short(root)}: {type(e).__name__}: {e}", BLOCKER))
    token, data = spec.token
    if token:
        try:
            seen = read_bytes(token) == data
            rows.append(("storage shared", f"reads the driver's {short(token)}" if seen else
                         f"{short(token)} holds other bytes than the driver wrote", OK if seen else BLOCKER))
        except Exception as e:
            rows.append(("storage shared", f"cannot read the driver's {short(token)} ({type(e).__name__}): "
                         "the storage root is not shared with the driver; use a bucket (s3://, gs://) or a "
                         "shared filesystem", BLOCKER))
    return rows


def data_row(name: str, path: str) -> tuple[str, str, str]:
    """Whether a dataset is readable and non-empty from here (footers and its first scenario)."""
    from smart_r1.data.dataset import data_source, is_tfrecord, iter_scenarios
    from smart_r1.data.index import scenario_index

    try:
        if is_tfrecord(data_source(path)):
            first, count = next(iter_scenarios(path, 1), None), "TFRecords"
        else:
            index = scenario_index(path)
            count = f"{len(index)} scenarios"
            first = index.read([0])[0] if len(index) else None
        if first is None:
            return f"data {name}", f"{short(path)}: empty", BLOCKER
        return (f"data {name}", f"{short(path)}: {count}, the first ({first.scenario_id}) with "
                f"{int(first.sim_agent_mask.sum())} sim agents", OK)
    except Exception as e:
        return f"data {name}", f"{short(path)}: {type(e).__name__}: {e}", BLOCKER


def tracking_row(uri: str) -> tuple[str, str, str]:
    from smart_r1.tracking.mlflow_runs import check_tracking_uri

    try:
        check_tracking_uri(uri)
        return "MLflow", f"{uri} answers", OK
    except ValueError as e:
        return "MLflow", str(e), BLOCKER


def process_checks(spec: ProbeSpec, device: torch.device | str | None = None) -> list[tuple[str, str, str]]:
    """(check, value, status) of this process, as the run would use it: its device is CUDA when
    the run gives it a GPU and CUDA works here, else the CPU (as learners and actors fall back)."""
    from smart_r1.model.precision import bf16_native, compute_dtype, numerics

    cuda = torch.cuda.is_available()
    if device is None:
        device = "cuda" if spec.want_gpu and cuda else "cpu"
    device = torch.device(device)
    rows = [("torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none, a CPU build'})", OK)]
    if cuda:
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        rows.append(("CUDA", f"available: {torch.cuda.device_count()} x {', '.join(names)}", OK))
    else:
        rows.append(("CUDA", "not available" + (": the run gives this process a GPU" if spec.want_gpu
                                                 else " (the run uses no GPU here)"),
                     BLOCKER if spec.want_gpu else OK))
    rows.append(driver_row(torch.version.cuda, driver_version(), spec.want_gpu))
    native = bf16_native(device)
    rows.append(("bf16", f"{'native' if native else 'not native (emulated: slow)'} on {device.type}", OK))
    precision = numerics(device, spec.precision)
    emulated = compute_dtype(device, spec.precision) == torch.bfloat16 and not native
    rows.append(("precision", f"model.precision {spec.precision} -> {precision}"
                 + (" (emulated on this CPU: about 100x slower than float32)" if emulated else ""),
                 WARN if emulated else OK))
    rows.append(memory_row(device, spec.estimate_bytes))
    name = f"{spec.role.replace(' ', '_')}-{os.getpid()}"
    rows += storage_rows(spec, name)
    rows += [data_row(n, p) for n, p in spec.datasets]
    if spec.tracking_uri.startswith(("http://", "https://")) and spec.role == "learner":
        rows.append(tracking_row(spec.tracking_uri))
    return rows


def short(path: str) -> str:
    """A path or URI as the table shows it: without a URI's options (endpoint, keys, region)."""
    from smart_r1.storage import display

    return display(path).split("?", 1)[0]


def _node() -> str:
    import ray

    return f"{ray.util.get_node_ip_address()} {ray.get_runtime_context().get_node_id()[:8]}"


# -- the remote probes ----------------------------------------------------------------------------

class _Rows:
    """A Ray actor collecting the probes' rows: what a probe found before a failure stays found."""

    def __init__(self):
        self.rows: list[Row] = []

    def add(self, rows: list[Row]) -> None:
        self.rows += rows

    def all(self) -> list[Row]:
        return self.rows


def _learner_probe(config: dict) -> None:
    """A Ray Train worker's probe: the process rows, then an all-reduce over the process group."""
    import ray.train
    import torch.distributed as dist

    spec, collector = config["spec"], config["collector"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    where = (f"learner {rank}", _node())
    rows = [Row(*where, *c) for c in process_checks(spec, device)]
    ray.get(collector.add.remote(rows))
    if world > 1:
        backend = dist.get_backend() if dist.is_initialized() else "none"
        t0 = time.perf_counter()
        value = torch.tensor([float(rank + 1)], device=device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(value)
        expected = world * (world + 1) / 2
        if rank == 0 or value.item() != expected:  # every rank checks its sum; rank 0 says it for all
            row = Row(*where, "all-reduce", f"{world} ranks over {backend} on {device.type}: {value.item():g} "
                      f"(expected {expected:g}) in {time.perf_counter() - t0:.2f}s",
                      OK if value.item() == expected else BLOCKER)
            ray.get(collector.add.remote([row]))
    elif rank == 0:
        ray.get(collector.add.remote([Row(*where, "all-reduce", "none: one learner (ray.num_learners 1)")]))
    ray.train.report({"probed": 1})


class _ActorProbe:
    """A rollout actor's probe (created with the rollout actors' resources)."""

    def probe(self, spec: ProbeSpec, index: int) -> list[Row]:
        where = (f"rollout actor {index}", _node())
        return [Row(*where, *c) for c in process_checks(spec)]


def probe_actors(config: PipelineConfig, spec: ProbeSpec, timeout_s: float) -> list[Row]:
    """ray.num_rollout_workers probes with the rollout actors' CPUs and GPUs."""
    import ray

    r = config.ray
    actor = ray.remote(_ActorProbe).options(num_cpus=r.cpus_per_rollout_worker, num_gpus=r.gpus_per_rollout_worker)
    actors = [actor.remote() for _ in range(r.num_rollout_workers)]
    refs = [a.probe.remote(spec, i) for i, a in enumerate(actors)]
    done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    rows = []
    for ref in done:
        try:
            rows += ray.get(ref)
        except Exception as e:
            rows.append(Row("rollout actor", "?", "probe", f"{type(e).__name__}: {e}", BLOCKER))
    if pending:
        rows.append(Row("rollout actors", "-", "placement",
                        f"{len(pending)} of {len(refs)} not placed in {timeout_s:.0f}s with "
                        f"{{CPU: {r.cpus_per_rollout_worker:g}, GPU: {r.gpus_per_rollout_worker:g}}} each: no node "
                        "offers that (or the autoscaler did not add one in time)", BLOCKER))
    for a in actors:
        ray.kill(a)
    return rows


def probe_learners(config: PipelineConfig, spec: ProbeSpec, timeout_s: float) -> list[Row]:
    """The learners' probe: a TorchTrainer as `run_learner` builds it, its process group with a
    timeout of `timeout_s`; it waits at most `timeout_s` to be placed."""
    import ray
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from smart_r1.distributed.learner import learner_scaling, ray_storage, torch_config, train_logging
    from smart_r1.storage import join, remove_tree, root

    r = config.ray
    collector = ray.remote(_Rows).options(num_cpus=0).remote()
    storage = r.storage_path or join(root(config.out_dir), "ray")
    name = f"preflight-{uuid.uuid4().hex[:8]}"
    trainer = TorchTrainer(
        _learner_probe, train_loop_config={"spec": spec, "collector": collector},
        torch_config=dataclasses.replace(torch_config(), timeout_s=int(timeout_s)),
        scaling_config=learner_scaling(r),
        run_config=RunConfig(name=name, **ray_storage(storage), failure_config=FailureConfig(max_failures=0),
                             logging_config=train_logging(r)))
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except Exception as e:  # Ray Train raises some failures instead of returning them
            outcome["error"] = e

    thread = threading.Thread(target=fit, daemon=True)  # a group that is never placed must not hang us
    thread.start()
    thread.join(timeout_s)
    rows = ray.get(collector.all.remote(), timeout=60)
    error = outcome.get("error") or getattr(outcome.get("result"), "error", None)
    if thread.is_alive():
        gpu = ", GPU: 1" if r.use_gpu else ""
        rows.append(Row("learners", "-", "placement", f"{r.num_learners} x {{CPU: {r.cpus_per_learner:g}{gpu}}} "
                        f"not running after {timeout_s:.0f}s: no node offers that (or the autoscaler did not add "
                        "one in time)", BLOCKER))
    elif error is not None:
        rows.append(Row("learners", "-", "learner group", f"failed: {type(error).__name__}: "
                        f"{str(error).strip().splitlines()[-1][:300] if str(error).strip() else ''}", BLOCKER))
    try:
        remove_tree(join(storage, name))
    except Exception:  # its leftovers are a few KB of Ray Train's run state
        pass
    ray.kill(collector)
    return rows


# -- the driver's checks, the table and the verdict ------------------------------------------------

def cluster_rows(config: PipelineConfig) -> list[Row]:
    """Ray's resources now (and at its autoscaling maximum, where known) against the run's."""
    import ray

    from smart_r1.distributed.resources import autoscaling_max, resources_needed

    where = ("driver", _node())
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    have = ray.cluster_resources()
    rows = [Row(*where, "Ray", f"{ray.__version__}: {len(nodes)} node(s), {have.get('CPU', 0):g} CPUs, "
                f"{have.get('GPU', 0):g} GPUs now")]
    most = autoscaling_max()
    local = not os.environ.get("RAY_ADDRESS")
    for key, need in resources_needed(config.ray).items():
        if need <= have.get(key, 0.0) + 1e-9:
            rows.append(Row(*where, f"{key}s", f"the run needs {need:g} at once; {have.get(key, 0.0):g} present"))
        elif local:
            rows.append(Row(*where, f"{key}s", f"the run needs {need:g} at once; this local Ray has "
                            f"{have.get(key, 0.0):g}", BLOCKER))
        elif most is not None and need > most.get(key, 0.0) + 1e-9:
            rows.append(Row(*where, f"{key}s", f"the run needs {need:g} at once; even at its autoscaling "
                            f"maximum the cluster has {most.get(key, 0.0):g}", BLOCKER))
        else:
            rows.append(Row(*where, f"{key}s", f"the run needs {need:g} at once; {have.get(key, 0.0):g} present "
                            "now, the rest must come from the autoscaler", WARN))
    return rows


def driver_rows(config: PipelineConfig, token: tuple[str, bytes]) -> list[Row]:
    """The run folder's identity, MLflow's store and server, the storage roots and the
    generated data, checked on the driver."""
    import ray

    from smart_r1.data.dataset import expand_inputs
    from smart_r1.distributed.pipeline import wanted_datasets
    from smart_r1.distributed.run_identity import check_run
    from smart_r1.storage import join, write_bytes
    from smart_r1.tracking.mlflow_runs import (check_tracking_uri, cluster_tracking_problem, is_local_store,
                                               resolve_tracking_uri)

    where = ("driver", _node())
    rows = []
    try:
        check_run(config)
        rows.append(Row(*where, "run folder", f"{short(config.out_dir)}: new, or made with this config"))
    except ValueError as e:
        rows.append(Row(*where, "run folder", str(e), BLOCKER))
    uri = resolve_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"))
    problem = cluster_tracking_problem(ray.nodes(), uri, ray.get_runtime_context().get_node_id())
    if not problem and is_local_store(uri) and "working_dir_files" in uri:
        problem, status = (f"{uri} is inside the job's copy of its working folder, which Ray deletes after the "
                           "job: set MLFLOW_TRACKING_URI (a server, or a path outside it)"), WARN
    else:
        status = BLOCKER
    try:
        check_tracking_uri(uri)
        rows.append(Row(*where, "MLflow", problem or f"{uri}", status if problem else OK))
    except ValueError as e:
        rows.append(Row(*where, "MLflow", str(e), BLOCKER))
    path, data = token
    try:
        write_bytes(path, data)
        rows.append(Row(*where, "storage", f"wrote {short(path)} for the other processes to read"))
    except Exception as e:
        rows.append(Row(*where, "storage", f"{short(path)}: {type(e).__name__}: {e}", BLOCKER))
    training, scoring = wanted_datasets(config)
    generated = [n for n in dict.fromkeys(training + scoring)
                 if (n == "train" and not config.data.train) or n.startswith("sumo_")]
    if generated:
        sumo = importlib.util.find_spec("sumo") is not None  # eclipse-sumo: the simulator binaries
        rows.append(Row(*where, "data generated", f"{', '.join(generated)} generated here: eclipse-sumo "
                        + ("found" if sumo else "is not installed"), "ok" if sumo else BLOCKER))
    real = config.data.real_source()
    if any(n.startswith("real_") for n in training + scoring):
        try:
            files = expand_inputs(real if ".tfrecord" in real else join(real, "*.tfrecord*"))
            rows.append(Row(*where, "data real", f"{len(files)} TFRecord files in {short(real)}, split here into "
                            "real_train / real_tune / real_report"))
        except (FileNotFoundError, OSError) as e:
            rows.append(Row(*where, "data real", f"{short(real)}: {e}", BLOCKER))
    return rows


def memory_estimate(config: PipelineConfig) -> tuple[dict[str, int], Row]:
    """Each process kind's estimated peak memory on its device (`memory_estimate.estimate_peak_bytes`:
    WOMD's largest scenes, the preset's measured costs), and the driver's row saying so."""
    from smart_r1.distributed.memory_estimate import estimate_peak_bytes

    where = ("driver", _node())
    try:
        peaks = estimate_peak_bytes(config)
    except ValueError as e:
        return {}, Row(*where, "memory estimate", f"none: {e}", WARN)
    where_learner = "GPU" if config.ray.use_gpu else "node"
    where_actor = "GPU" if config.ray.gpus_per_rollout_worker > 0 else "node"
    return peaks, Row(*where, "memory estimate", f"learner {peaks['learner'] / GIB:.1f} GiB ({where_learner}), rollout "
                      f"actor {peaks['rollout_worker'] / GIB:.1f} GiB ({where_actor}), at WOMD's largest scenes; "
                      "processes that share a node share its memory")


def datasets(config: PipelineConfig) -> tuple[tuple[str, str], ...]:
    """The data the learners and actors will read, where the config names it (generated sets
    do not exist before the run)."""
    named = (("train", config.data.train), ("heldout", config.data.heldout))
    return tuple((n, p) for n, p in named if p)


def compact(rows: list[Row]) -> list[Row]:
    """Rows equal but for their process and node, printed once: 'rollout actor 0, 1' on '2 nodes'."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        kind = re.sub(r" \d+$", "", row.process)
        groups.setdefault((kind, row.check, row.value, row.status), []).append(row)
    out = []
    for (kind, check, value, status), same in groups.items():
        if len(same) == 1:
            out.append(same[0])
            continue
        numbers = sorted((p.process.rsplit(" ", 1)[-1] for p in same), key=lambda n: (len(n), n))
        nodes = sorted({p.node for p in same})
        out.append(Row(f"{kind} {', '.join(numbers)}", nodes[0] if len(nodes) == 1 else f"{len(nodes)} nodes",
                       check, value, status))
    return out


def table(rows: list[Row]) -> str:
    """A markdown table, blockers and warnings marked."""
    head = ["| process | node | check | found | status |", "|---|---|---|---|---|"]
    return "\n".join(head + [f"| {r.process} | {r.node} | {r.check} | {r.value.replace('|', '/')} | {r.status} |"
                             for r in rows])


def verdict(rows: list[Row]) -> tuple[int, str]:
    """(exit status, verdict line): 1 and the blockers named when there is any, else 0."""
    blockers = [r for r in rows if r.status == BLOCKER]
    warnings = [r for r in rows if r.status == WARN]
    if blockers:
        named = "; ".join(f"{r.process}: {r.check}" for r in blockers)
        return 1, f"preflight: BLOCKED by {len(blockers)} finding(s) ({named}); fix them before the run"
    return 0, ("preflight: READY" + (f", {len(warnings)} warning(s) ({'; '.join(f'{r.process}: {r.check}' for r in warnings)})"
                                      if warnings else ""))


def run_preflight(config: PipelineConfig, timeout_s: float = 600.0) -> int:
    """Every check, one table, the verdict; returns the exit status. Ray must be initialised."""
    from smart_r1.storage import join, remove_tree, root

    t0 = time.perf_counter()
    r = config.ray
    out = root(config.out_dir)
    roots = tuple(dict.fromkeys([out, *([r.storage_path] if r.storage_path else [])]))
    token = (join(out, ".preflight", f"driver-{uuid.uuid4().hex[:8]}"), uuid.uuid4().bytes)
    rows = cluster_rows(config) + driver_rows(config, token)
    peaks, row = memory_estimate(config)
    rows.append(row)
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
    base = ProbeSpec(role="", want_gpu=False, precision=config.model.precision, roots=roots, token=token,
                     datasets=datasets(config), tracking_uri=tracking)
    placeable = not any(row.status == BLOCKER and row.check in ("CPUs", "GPUs") for row in rows)
    if placeable:
        rows += probe_learners(config, dataclasses.replace(base, role="learner", want_gpu=r.use_gpu,
                                                           estimate_bytes=peaks.get("learner", 0)), timeout_s)
        rows += probe_actors(config, dataclasses.replace(base, role="rollout actor",
                                                         want_gpu=r.gpus_per_rollout_worker > 0,
                                                         estimate_bytes=peaks.get("rollout_worker", 0)), timeout_s)
    try:
        remove_tree(join(out, ".preflight"))  # the token, and what a probe could not delete
    except Exception:
        pass
    rows = compact(rows)
    code, line = verdict(rows)
    print(f"{table(rows)}\n\n{line} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return code
