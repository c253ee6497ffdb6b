"""A Ray Tune sweep of MPO's alpha (fixed baseline) and beta (KL weight) over RFT -> SFT.

    shared SFT checkpoint (made once: the pipeline's stages before RFT, or given)
        -> trial (alpha, beta): RFT (MPO) -> SFT -> held-out WOSAC metrics, one per grid point

Each trial is a Tune function trainable that runs `run_pipeline` on a pipeline config holding
only the trial's stages, starting from the shared checkpoint (so the earlier DAG stages are never
recomputed). It calls `run_pipeline` once per stage, growing the stage list, and reports the
stage's held-out metrics with `ray.tune.report` after each: ASHA can then stop a bad trial after
RFT. `run_pipeline` skips finished stages, so a trial that is restarted (after an interrupted
sweep, or a failure retried by Tune) continues where it stopped; `Tuner.restore` leaves finished
trials alone.

Resources. A trial is the driver of a Ray Train run (Train V2 pattern): its own process only
waits, its rollout actors and its learners do the work. The trial's placement group therefore
holds an empty head bundle plus one bundle per rollout actor (Tune captures the trial's child
actors into it), so a trial starts only when its rollout actors fit and spreads to whichever
node has room on a cluster. The learners are requested by Ray Train itself (its own placement
group, which the autoscaler can serve with GPU nodes). Because Tune does not see those, a trial
could hold its rollout CPUs while its learner waits for CPUs that another trial's rollouts hold;
`max_concurrent_trials` is capped (by default) at the number of whole trials, rollouts plus
learners, that the cluster's CPUs and GPUs hold, so trials queue instead of deadlocking.

The sweep's config is `sweep_config.py`; its rows, ranking and table `sweep_results.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from smart_r1.config import PipelineConfig
from smart_r1.distributed.pipeline import prepare_data, prepare_tokens, run_pipeline
from smart_r1.distributed.resources import autoscaling_max, resources_needed, trial_resources, whole_trials
from smart_r1.distributed.run_identity import fingerprint
from smart_r1.distributed.sweep_config import SweepConfig, check_space, split_stages, trial_config
from smart_r1.distributed.sweep_results import METRICS, best_row, sweep_report, trial_dir, trial_row
from smart_r1.distributed.worker_kit import MODEL_NAME
from smart_r1.distributed.learner import ray_storage
from smart_r1.storage import (base_name, copy_file, display, exists, is_dir, is_local, join, read_json, root,
                              write_json, write_text)
from smart_r1.tracking.mlflow_runs import RunTracker, check_tracking_uri, folder_run, resolve_tracking_uri


SYNC_PERIOD_S = 15  # Tune's experiment state (KBs) to the storage root at most this often


def resolve_shared(checkpoint: str, base: PipelineConfig, rft_stage: str) -> tuple[str, dict[str, str]]:
    """The given shared SFT checkpoint and data paths it comes with: a checkpoint file, or a
    pipeline run folder (its last finished stage before RFT and its generated training data); either a
    local path or a storage URI (`s3://...`), so trials on other nodes can read it."""
    path = root(checkpoint)
    if not exists(path):
        raise ValueError(f"shared SFT checkpoint: no such file or run folder {display(checkpoint)!r}")
    if not is_dir(path):
        return path, {}
    before, _ = split_stages(base, rft_stage)
    name = before[-1].name if before else "sft"
    done = join(path, name, "done.json")
    if not exists(done):
        raise ValueError(f"shared SFT checkpoint: {display(path)} is not a pipeline run folder with a finished "
                         f"{name!r} stage ({display(done)} is missing)")
    ckpt = join(path, name, MODEL_NAME)  # where the pipeline puts it
    if not exists(ckpt):
        raise ValueError(f"shared SFT checkpoint: {display(ckpt)} is missing")
    data = {"train": join(path, "data", "train")} if exists(join(path, "data", "train")) else {}
    return ckpt, data


def _identity(sweep: SweepConfig, base: PipelineConfig) -> dict:
    """What must not change between an interrupted sweep and its resumption."""
    space = {k: v for k, v in dataclasses.asdict(sweep).items() if k not in ("out_dir", "max_concurrent_trials")}
    # resources (the ray section) change no result, as in the runs' fingerprints (run_identity)
    pipeline = {k: v for k, v in base.to_dict().items() if k not in ("out_dir", "ray")}
    return json.loads(json.dumps({"sweep": space, "pipeline": pipeline}))


def preflight(sweep: SweepConfig, base: PipelineConfig, checkpoint: str = "") -> None:
    """Every check that can fail before any stage or trial starts; raises ValueError."""
    check_space(sweep, base, checkpoint)
    if checkpoint:
        resolve_shared(checkpoint, base, sweep.rft_stage)
    saved = read_json(join(root(sweep.out_dir), "sweep.json"), None)
    if saved is not None:  # a sweep.json written before resources left the identity still compares
        saved = {**saved, "pipeline": {k: v for k, v in saved.get("pipeline", {}).items() if k != "ray"}}
    if saved is not None and saved != _identity(sweep, base):
        raise ValueError(f"{display(sweep.out_dir)} holds a sweep with a different search space or pipeline "
                         "config (sweep.json); resume it with the same config or pick a new --out-dir")
    check_tracking_uri(resolve_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI")))


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares (sent once through the object store by `tune.with_parameters`)."""

    base: PipelineConfig  # init_checkpoint = the shared SFT checkpoint; absolute data paths
    rft_stage: str
    datasets: str  # the tune sets trials are scored on (`eval.datasets`), the ranking one first
    trials_dir: str
    tracking_uri: str
    sweep_run_id: str


def run_trial(params: dict, setup: TrialSetup) -> None:
    """The Tune function trainable: RFT with this alpha/beta, then the later stages; one
    `tune.report` of held-out metrics per stage."""
    alpha = params["alpha"] if isinstance(params["alpha"], str) else float(params["alpha"])
    beta = float(params["beta"])
    trial_id = tune.get_context().get_trial_id()  # kept by Tuner.restore: a restarted trial finds its folder
    out = trial_dir(setup.trials_dir, trial_id, alpha, beta)
    config = trial_config(setup.base, setup.rft_stage, alpha, beta, out, setup.datasets)
    ranked = setup.datasets.split(",")[0]
    # run_pipeline reads the tracking URI from the environment, and a trial's process on a
    # cluster node does not inherit the driver's
    os.environ["MLFLOW_TRACKING_URI"] = setup.tracking_uri
    # the trial's folder keeps its run, which `run_pipeline` resumes: its stages nest under it
    tracker, new = folder_run(out, f"trial {trial_id}", parent=RunTracker(setup.tracking_uri, setup.sweep_run_id))
    if new:
        tracker.log_params({"alpha": alpha, "beta": beta, "trial_id": trial_id, "config": config.to_dict()})
    print(f"[sweep] trial {trial_id} starts: alpha={alpha} beta={beta:.4g} in {display(out)}", flush=True)
    for k, stage in enumerate(config.stages):
        done = join(out, stage.name, "done.json")
        last = k + 1 == len(config.stages)
        if exists(done) and (not last or exists(join(out, "results.json"))):
            # finished before the sweep was interrupted (Tune's state in the storage root can lag
            # by its sync period): its metrics are read back, no actor or learner is started
            print(f"[sweep] trial {trial_id}: {stage.name} already finished", flush=True)
            scored = read_json(done)["metrics"][ranked]
        else:
            scored = run_pipeline(dataclasses.replace(config, stages=config.stages[: k + 1]))[stage.name][ranked]
        metrics = {key: float(scored[key]) for key in METRICS if key in scored}
        tracker.log_metrics({f"{ranked}/{key}": v for key, v in metrics.items()}, step=k)
        tune.report({**metrics, "stage": stage.name, "complete": k + 1 == len(config.stages)})


def shared_base(sweep: SweepConfig, base: PipelineConfig, out: str, checkpoint: str, tracker) -> PipelineConfig:
    """The pipeline config trials start from: the shared SFT checkpoint (given, or made here once
    by the stages before RFT), absolute data paths or URIs, and the shared folder's generated data
    sets and token shards (`data.generated_root`, `data.tokens_root`), so that no trial prepares
    data again."""
    before, _ = split_stages(base, sweep.rft_stage)
    base_dir = join(out, "base")
    data = dataclasses.replace(base.data, generated_root=base_dir, tokens_root=base_dir,
                               **{k: root(v) for k, v in (("train", base.data.train), ("heldout", base.data.heldout),
                                                          ("real", base.data.real_source())) if v})
    trial_eval = dataclasses.replace(base.eval, datasets=sweep.trial_datasets(base))
    if checkpoint:
        ckpt, found = resolve_shared(checkpoint, base, sweep.rft_stage)
        if not is_local(out) and is_local(ckpt):
            # a trial may run on any node: its learners get the weights from the trial's process,
            # which reads them from the sweep's root, not from this machine's disk
            stored = join(base_dir, "shared_sft.pt")
            print(f"[sweep] copying the shared SFT checkpoint {ckpt} to {display(stored)}", flush=True)
            copy_file(ckpt, stored)
            ckpt = stored
        data = dataclasses.replace(data, **{k: v for k, v in found.items() if not getattr(base.data, k)})
        datasets = prepare_data(dataclasses.replace(base, data=data, eval=trial_eval), base_dir)
    else:
        config = dataclasses.replace(base, data=data, out_dir=base_dir, stages=before, eval=trial_eval)
        folder_run(base_dir, "shared stages", parent=tracker)
        print(f"[sweep] shared stages {[s.name for s in before]} in {display(base_dir)} (skipped where finished)",
              flush=True)
        run_pipeline(config)
        ckpt = join(base_dir, before[-1].name, MODEL_NAME)
        datasets = prepare_data(config, base_dir)
    # The trials' supervised stages train on token shards made once here, under the shared folder
    # (a trial tokenising for itself would redo it per trial, inside its placement group).
    shared = dataclasses.replace(base, data=data, init_checkpoint=ckpt, eval=trial_eval).validate()
    _, trial_stages = split_stages(base, sweep.rft_stage)
    prepare_tokens(dataclasses.replace(shared, out_dir=base_dir, stages=trial_stages), datasets, base_dir, ckpt)
    return shared


def run_sweep(sweep: SweepConfig, base: PipelineConfig, checkpoint: str = "") -> list[dict]:
    """Run (or resume) the sweep; returns its rows and writes results.{md,json} and best.json
    to the sweep folder. Ray must be initialised."""
    preflight(sweep, base, checkpoint)
    out = root(sweep.out_dir)  # a local folder (made absolute) or a bucket URI: the sweep's storage root
    write_json(join(out, "sweep.json"), _identity(sweep, base))
    tracker, new = folder_run(out, base_name(out))  # a resumed sweep keeps its MLflow run
    if new:
        tracker.log_params({"sweep": dataclasses.asdict(sweep), "pipeline": base.to_dict()})
    trial_base = shared_base(sweep, base, out, checkpoint, tracker)
    setup = TrialSetup(trial_base, sweep.rft_stage, sweep.trial_datasets(base), join(out, "trials"),
                       tracker.tracking_uri, tracker.run_id)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), trial_resources(base.ray))
    name = f"sweep-{fingerprint(_identity(sweep, base))}"  # a sweep of another space never resumes this one
    # Tune's state lives in the same root: a local folder, or the bucket through its filesystem
    storage = ray_storage(join(out, "tune"))
    path = join(storage["storage_path"], name)
    filesystem = storage.get("storage_filesystem")
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        print(f"[sweep] resuming {display(join(out, 'tune', name))}: finished trials are kept", flush=True)
        # Errored trials (already retried by FailureConfig) stay errored: Tune starts every
        # restored unfinished trial at once, and the search algorithm's concurrency cap only
        # bounds those (it limits trials alive at a time), not extra errored ones on top.
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False,
                                   storage_filesystem=filesystem)
    else:
        present = ray.cluster_resources()
        cluster = autoscaling_max() or present  # a cluster that starts small grows to its maximum
        concurrent = sweep.max_concurrent_trials or whole_trials(base.ray, cluster)
        if resources_needed(base.ray)["CPU"] > cluster.get("CPU", 0):
            print(f"[sweep] warning: one trial needs more CPUs than the cluster has ({cluster.get('CPU', 0):g}); "
                  "it waits for the autoscaler (or forever on a fixed machine: lower ray.cpus_* in the config)",
                  flush=True)
        _, stages = split_stages(base, sweep.rft_stage)
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=len(stages),
                                   grace_period=sweep.asha_grace_period, reduction_factor=2)
                     if sweep.asha else None)
        source = ("given" if sweep.max_concurrent_trials else
                  "the cluster at its autoscaling maximum" if cluster is not present else "the cluster now")
        print(f"[sweep] {sweep.search} search, up to {concurrent} trial(s) at a time ({source})", flush=True)
        tuner = tune.Tuner(
            trainable, param_space=sweep.space(),
            tune_config=tune.TuneConfig(metric="metametric", mode="max", num_samples=sweep.num_samples,
                                        max_concurrent_trials=concurrent, scheduler=scheduler),
            # a retried trial continues from its last finished stage (and the learner from its last
            # checkpoint), so a trial killed by a node failure or the OOM killer costs little
            # the sweep's state reaches the storage root every SYNC_PERIOD_S (Tune's default, 5
            # minutes, would lose that much of a sweep's progress to a driver that dies)
            run_config=tune.RunConfig(name=name, **storage, verbose=1 if base.ray.verbose else 0,
                                      sync_config=tune.SyncConfig(sync_period=SYNC_PERIOD_S),
                                      failure_config=tune.FailureConfig(max_failures=2)))
    rows = [trial_row(r) for r in tuner.fit()]
    _, stages = split_stages(base, sweep.rft_stage)
    table = sweep_report(rows, setup.trials_dir, stages[-1].name, setup.datasets.split(",")[0])
    write_text(join(out, "results.md"), table)
    write_json(join(out, "results.json"), rows)
    tracker.log_artifact(join(out, "results.md"))
    failed = [r for r in rows if r["status"] == "error"]
    best = best_row(rows)
    record = {**best, "objective": f"realism meta metric on {setup.datasets.split(',')[0]} after the last stage "
                                   "(max); ties at 4 decimals go to lower collision + off-road rate, then lower minADE",
              "overrides": [f"{sweep.rft_stage}.alpha={best['alpha']}", f"{sweep.rft_stage}.beta={best['beta']}"],
              "config": trial_config(trial_base, sweep.rft_stage, best["alpha"], best["beta"], "").to_dict()}
    write_json(join(out, "best.json"), record)
    tracker.log_artifact(join(out, "best.json"))
    tracker.log_metrics({**({} if isinstance(best["alpha"], str) else {"best_alpha": best["alpha"]}),
                         "best_beta": best["beta"], **{f"best_{k}": v for k, v in best["metrics"].items()}})
    tracker.finish("FAILED" if failed else "FINISHED")
    print(f"\n[sweep] {len(rows)} trials ({len(failed)} failed); results in {display(out)}\n{table}\n"
          f"[sweep] best: alpha={best['alpha']} beta={best['beta']:.4g} "
          f"meta={best['metrics']['metametric']:.4f} -> {display(join(out, 'best.json'))}", flush=True)
    return rows
