"""The Ray Train learner: a `TorchTrainer` (Train V2) whose workers run one stage's training loop.

The training state is written by rank 0 to the stage folder (`last_state.pt`, every epoch and
every `checkpoint_every` RL steps, `worker_kit.report`): a worker group that Ray Train restarts
after a failure (`FailureConfig`: a lost node, a crashed worker) resumes from it, and so does a
re-run of the pipeline from a new driver. Ray Train gets metrics only; its storage (a local folder
or a URI, the run's storage root by default; an object store's URI is handed to it as its
`pyarrow.fs` filesystem and the path inside it, so its options reach every worker) keeps its run
records. Weights go in through Ray's object store (the starting and reference checkpoints' bytes)
and come out through `last_state.pt`, from which the driver writes the stage's `model.pt`. The
loops are `supervised_loop` (BC, CAT-K SFT) and `mpo_loop` (RFT); what they share is `worker_kit`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tempfile
from datetime import timedelta
from pathlib import Path

import ray
import torch.distributed as dist
from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.backend import Backend
from ray.train.torch import TorchConfig, TorchTrainer

from smart_r1.config import RayConfig
from smart_r1.distributed.mpo_loop import mpo_loop
from smart_r1.distributed.supervised_loop import supervised_loop
from smart_r1.distributed.worker_kit import LAST_NAME, MODEL_NAME, LearnerJob, read_last_state, weights_ref
from smart_r1.model.checkpoint import checkpoint_bytes, load_checkpoint, save_checkpoint
from smart_r1.storage import base_name, join, parent, resolve, write_bytes


_store = None  # worker 0's TCPStore server while its process group lives


def _host_store(world_size: int, timeout_s: int) -> int:
    """Worker 0: a TCPStore served from a socket bound to 127.0.0.1 (given a port, TCPStore binds
    all interfaces, whatever the host); returns the port."""
    global _store
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    _store = dist.TCPStore("127.0.0.1", port, world_size, is_master=True, master_listen_fd=sock.detach(),
                           wait_for_workers=False, timeout=timedelta(seconds=timeout_s))
    return port


def _join(backend: str, port: int, timeout_s: int) -> None:
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(ctx.get_local_rank()),
                      LOCAL_WORLD_SIZE=str(ctx.get_local_world_size()), NODE_RANK=str(ctx.get_node_rank()))
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # as Ray Train does
    store = _store if rank == 0 else dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                                                   timeout=timedelta(seconds=timeout_s))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def _leave(destroy: bool) -> None:
    global _store
    if destroy and dist.is_initialized():
        dist.destroy_process_group()
    _store = None


class _LoopbackTorchBackend(Backend):
    """Ray Train's torch process group (gloo or NCCL) on a store that listens on 127.0.0.1 only;
    gloo and NCCL bind the interface ray_runtime names (GLOO/NCCL_SOCKET_IFNAME)."""

    def on_start(self, worker_group, backend_config: TorchConfig):
        port = worker_group.execute_single(0, _host_store, len(worker_group), backend_config.timeout_s)
        worker_group.execute(_join, backend_config.backend or "gloo", port, backend_config.timeout_s)

    def on_shutdown(self, worker_group, backend_config: TorchConfig):
        worker_group.execute(_leave, len(worker_group) > 1)  # Ray Train's choice for one worker


class LoopbackTorchConfig(TorchConfig):
    """TorchConfig for a Ray on loopback (one machine): every worker is on this host."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


def torch_config() -> TorchConfig:
    """Ray Train's default; on a local Ray (node IP 127.0.0.1: ray_runtime.ensure_ray) one whose
    process group's store listens on 127.0.0.1 as well."""
    local = ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback
    return LoopbackTorchConfig() if local else TorchConfig()


def learner_scaling(ray_cfg: RayConfig) -> ScalingConfig:
    """The learners' workers and resources (the preflight's probe asks for the same)."""
    return ScalingConfig(num_workers=ray_cfg.num_learners, use_gpu=ray_cfg.use_gpu,
                         resources_per_worker={"CPU": ray_cfg.cpus_per_learner,
                                               **({"GPU": ray_cfg.gpus_per_learner} if ray_cfg.use_gpu else {})})


def train_logging(ray_cfg: RayConfig) -> LoggingConfig:
    """Ray Train's console lines: its INFO ones (worker group started, checkpoint created, result
    reported) only with `ray.verbose`; its log files keep every level either way."""
    return LoggingConfig(log_level="INFO" if ray_cfg.verbose else "WARNING")


def ray_storage(storage_path: str) -> dict:
    """RunConfig's storage arguments for a local folder or a URI: an object store's filesystem (with
    the URI's options: endpoint, region, scheme, keys) and the path inside it."""
    fs, key = resolve(storage_path)
    if fs is None:
        return {"storage_path": str(Path(key).resolve())}
    return {"storage_path": key, "storage_filesystem": fs}


def run_learner(job: LearnerJob, ray_cfg: RayConfig, storage_path: str) -> str:
    """Run the stage's loop on a TorchTrainer; returns the path of the final SMART-tiny checkpoint,
    `<stage_dir>/model.pt` (a local path or a URI, as `job.stage_dir`), which this process (the
    driver) writes from the stage's last training state: no worker writes it. `storage_path` (a
    local folder or a URI) holds Ray Train's run records.

    The starting and reference weights reach the learners through the object store (a path in
    `job` is read here and sent as bytes), so no learner reads a path on the driver's disk."""
    loop = mpo_loop if job.stage.kind == "mpo" else supervised_loop
    job = dataclasses.replace(job, init_checkpoint=weights_ref(job.init_checkpoint),
                              ref_checkpoint=weights_ref(job.ref_checkpoint) if job.ref_checkpoint else "")
    trainer = TorchTrainer(
        loop,
        train_loop_config={"job": job},
        torch_config=torch_config(),
        scaling_config=learner_scaling(ray_cfg),
        run_config=RunConfig(name=job.run_name or f"{base_name(parent(job.stage_dir))}-{job.stage.name}",
                             **ray_storage(storage_path),
                             failure_config=FailureConfig(max_failures=ray_cfg.max_learner_failures),
                             logging_config=train_logging(ray_cfg)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"stage {job.stage.name}: learner failed") from result.error
    out = join(job.stage_dir, MODEL_NAME)
    _model_from_last_state(job, out)
    return out


def _model_from_last_state(job: LearnerJob, out: str) -> None:
    """Write the stage's checkpoint `out` from its last training state (`last_state.pt`, written
    by rank 0 after the stage's last unit) on the stage's starting model (its config and
    vocabulary), CRC-checked and atomically."""
    state = read_last_state(job.stage_dir)
    last = (job.stage.steps if job.stage.kind == "mpo" else job.stage.epochs) - 1
    if state is None or state["progress"] != last:
        found = "is missing" if state is None else f"holds unit {state['progress']}, not the last ({last})"
        raise RuntimeError(f"stage {job.stage.name}: the learners finished but {join(job.stage_dir, LAST_NAME)} {found}")
    model = load_checkpoint(ray.get(job.init_checkpoint))
    model.load_state_dict(state["model"])
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(Path(d) / MODEL_NAME, model, {"stage": job.stage.name, "progress": state["progress"]})
        write_bytes(out, checkpoint_bytes(Path(d) / MODEL_NAME))
