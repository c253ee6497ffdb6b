"""What every learner loop of a Ray Train worker uses: the job it is handed, rank and world size,
the stage's model and optimiser resumed from the newest state, progress lines with an ETA, and the
per-epoch / per-RL-step report (metrics to MLflow, Ray Train and the stage's log; the training
state to the stage's folder, every epoch and every `checkpoint_every` RL steps).

The loops themselves are `supervised_loop.py` (BC, CAT-K SFT) and `mpo_loop.py` (RFT); the
TorchTrainer that runs them is `learner.py`. The method (losses, the MPO step, the optimiser
step) lives in `smart_r1.rl` and runs without Ray.
"""

from __future__ import annotations

import io
import resource
import sys
import time
from dataclasses import dataclass, field

import ray
import ray.train
import torch

from smart_r1.config import StageConfig
from smart_r1.model.checkpoint import checkpoint_bytes, load_checkpoint
from smart_r1.model.precision import numerics, set_precision
from smart_r1.storage import exists, flush_logs, join, read_bytes, save_torch, truncate_log, write_bytes, write_log_row
from smart_r1.tracking.mlflow_runs import RunTracker

MODEL_NAME = "model.pt"  # a plain SMART-tiny checkpoint (smart_r1.model.checkpoint)
# In the stage folder: the newest training state (model, optimizer, progress), the one copy a
# restarted learner group (Ray Train's FailureConfig) and a re-run of the pipeline resume from.
LAST_NAME = "last_state.pt"
TRAIN_LOG = "train_log.jsonl"  # in the stage folder: metrics of every epoch / RL step
FAILURE_MARKER = ".injected_failure"  # in the stage folder: the fault drill has fired


@dataclass(frozen=True)
class LearnerJob:
    """Everything a learner worker needs for one stage (plain values and actor handles)."""

    stage: StageConfig
    # The stage's folder in the run's storage root: a local path or a URI (`s3://...`), which rank 0
    # writes its log and state to through `smart_r1.storage` (every node reaches a bucket; a local
    # path only works where the learner shares the driver's disk).
    stage_dir: str
    # The model this stage starts from: an ObjectRef of the checkpoint's bytes
    # (`ray.put(checkpoint_bytes(path))`). A path given here is read by the driver in
    # `learner.run_learner` and sent the same way: a learner never reads a checkpoint path.
    init_checkpoint: object
    datasets: dict  # name -> data path or URI ("train" at least) that every node can read
    # Supervised stages: the folder(s) (local or URI) of the token shards of the data sets the stage
    # learns from, for its scene options (`smart_r1.tokens.cache`), made once by the pipeline; a
    # folder listed k times is drawn k times as often; "" or [] = the learner tokenises
    # `datasets["train"]` as it reads it (tests, benchmarks).
    scenes: str | list = ""
    seed: int = 0
    ref_checkpoint: object = ""  # MPO: the frozen reference policy, as init_checkpoint ("" = that one)
    rollout_workers: list = field(default_factory=list)  # MPO: RolloutWorker actor handles
    tracker: RunTracker | None = None
    threads: int = 1
    fail_once_at: int = -1  # fault injection for tests: raise once at this step/epoch
    run_name: str = ""  # the Ray Train run (its checkpoints); includes the stage's fingerprint
    task_timeout_s: float = 1800.0  # longest wait for one rollout task
    scenes_per_batch: int = 1  # MPO: scenarios a rollout actor simulates in one closed-loop batch
    # model.precision: each learner sets it for itself (`start_training`), since a process on
    # another node inherits nothing from the driver's environment
    precision: str = "auto"
    # MPO with the k3 KL: the rollout actors send log pi_ref of their rollouts when they compute as
    # the learner does (`precision.numerics`); False: the learner always runs the reference itself
    reference_in_workers: bool = True


def say(message: str) -> None:
    """Print one line from a learner worker. Ray Train patches `print` in its workers to both echo
    and log a line, which shows it twice on the driver; the real stdout shows it once."""
    print(message, file=sys.__stdout__ or sys.stdout, flush=True)


class Progress:
    """Prints `[stage] unit i/n ... eta` lines (rank 0 only)."""

    def __init__(self, stage: str, total: int, start: int = 0, enabled: bool = True):
        self.stage, self.total, self.start, self.enabled = stage, total, start, enabled
        self.t0 = time.perf_counter()

    def line(self, done: int, text: str) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 and done > self.start else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        eta_text = f"{eta // 60:.0f}m{eta % 60:02.0f}s" if eta == eta else "?"
        say(f"[{self.stage}] {done}/{self.total} {text} | elapsed {elapsed:.0f}s eta {eta_text}")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM, Linux's ru_maxrss in KB), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def world() -> tuple[int, int]:
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def read_last_state(stage_dir: str) -> dict | None:
    """The stage folder's newest training state (`last_state.pt`, rank 0 writes it with every
    checkpoint), or None."""
    last = join(stage_dir, LAST_NAME)
    if exists(last):
        return torch.load(io.BytesIO(read_bytes(last)), map_location="cpu", weights_only=True)
    return None


def training_state(model, optimizer, progress: int) -> dict:
    """What a checkpoint holds: the weights, AdamW's state and the last unit done (plain tensors)."""
    core = getattr(model, "module", model)
    return {"model": {k: v.detach().cpu() for k, v in core.state_dict().items()},
            "optimizer": optimizer.state_dict(), "progress": progress}


_KEPT_WEIGHTS: list = []  # ObjectRefs weights_ref made from paths: alive as long as this process


def weights_ref(checkpoint) -> ray.ObjectRef:
    """An ObjectRef of a checkpoint's bytes: a path is read here (on the driver), CRC-checked and
    put into Ray's object store once; an ObjectRef is passed on. A ref made here stays alive for
    this process's lifetime, since a restarted actor runs `__init__` again with it."""
    if isinstance(checkpoint, ray.ObjectRef):
        return checkpoint
    ref = ray.put(checkpoint_bytes(checkpoint))
    _KEPT_WEIGHTS.append(ref)
    return ref


def fetch_checkpoint(source) -> bytes:
    """A checkpoint's bytes from Ray's object store (they load with `load_checkpoint`)."""
    if not isinstance(source, ray.ObjectRef):
        raise TypeError(f"a learner gets checkpoints as ObjectRefs through Ray's object store, not "
                        f"{type(source).__name__} {source!r} (learner.run_learner sends a path's bytes)")
    return ray.get(source)


def start_training(job: LearnerJob, unit: str) -> tuple:
    """What every learner loop starts with: torch threads, rank and world size, the device, the
    stage's model and AdamW optimizer, resumed from the newest state when there is one.
    Returns (model, optimizer, device, rank, world_size, first epoch/step)."""
    torch.set_num_threads(max(1, job.threads))
    set_precision(job.precision)
    rank, world_size = world()
    device = ray.train.torch.get_device()
    model = load_checkpoint(fetch_checkpoint(job.init_checkpoint), map_location=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.stage.lr, weight_decay=job.stage.weight_decay)
    start = 0
    state = read_last_state(job.stage_dir)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["progress"]) + 1
        if rank == 0:
            say(f"[{job.stage.name}] resuming after {unit} {start - 1}")
    if rank == 0:  # rows of work after the newest checkpoint are redone, so logged again
        truncate_log(join(job.stage_dir, TRAIN_LOG), start)
        say(f"[{job.stage.name}] learners compute in {numerics(device)} (model.precision {job.precision})")
    return model, optimizer, device, rank, world_size, start


def report(job: LearnerJob, model, optimizer, progress: int, metrics: dict, rank: int, save: bool = True) -> None:
    """Log metrics (MLflow, the stage's log, Ray Train) and, with `save`, write the training state.

    One copy of the state is kept: rank 0 writes `<stage_dir>/last_state.pt` (model, optimizer,
    progress), atomically; a restarted learner group and a new driver both resume from it, and the
    driver makes the stage's `model.pt` from it (Ray Train gets metrics only). Crash consistency:
    the log's rows are flushed first (an object store's wait in the process until then), then the
    state is written; rows after the newest state are dropped on resume (`start_training`) and
    their units redone, so each unit is logged once.
    """
    core = getattr(model, "module", model)
    bad = [name for name, p in core.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:  # never saved: the last finite checkpoint stays the one to resume from
        raise FloatingPointError(f"stage {job.stage.name}: non-finite weights after {progress} ({bad[:3]}); "
                                 "not saved")
    if job.tracker is not None:
        job.tracker.for_rank(rank).log_metrics(metrics, step=progress)
    if rank == 0:
        write_log_row(join(job.stage_dir, TRAIN_LOG), {"progress": progress, **metrics,
                                                       "numerics": numerics(next(core.parameters()).device)})
        if save:
            flush_logs()
            save_torch(training_state(model, optimizer, progress), join(job.stage_dir, LAST_NAME))
    ray.train.report(metrics, checkpoint=None)


def maybe_fail(job: LearnerJob, progress: int) -> None:
    """Fault injection for the failure test: fail once, the first time `progress` is reached."""
    marker = join(job.stage_dir, FAILURE_MARKER)
    if progress == job.fail_once_at and not exists(marker):
        write_bytes(marker, b"")
        raise RuntimeError(f"injected learner failure at {progress}")
