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

Objective: the held-out realism meta metric after the last stage (higher is better). Meta
metrics that agree to 4 decimals (the table's precision, below the noise of a few rollouts) tie;
ties go to the lower collision + off-road rate, then the lower minADE.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from smart_r1.config import PipelineConfig, RayConfig, StageConfig

METRICS = ("metametric", "simulated_collision_rate", "simulated_offroad_rate", "min_average_displacement_error")


@dataclass(frozen=True)
class SweepConfig:
    """The search space and how the sweep runs; read from a YAML (pipelines/sweep_alpha_beta.yaml)."""

    pipeline: str  # the base pipeline YAML (its stages, data, model, eval, ray sections)
    out_dir: str = "runs/sweep_alpha_beta"
    search: str = "grid"  # grid: every (alpha, beta) pair; random: num_samples uniform draws
    alpha: tuple[float, ...] = (0.77,)  # grid values; random: drawn in [min, max]
    beta: tuple[float, ...] = (0.04,)
    num_samples: int = 1  # random: trials; grid: repeats of the whole grid
    rft_stage: str = "rft"  # the MPO stage whose alpha/beta are swept; it and later stages run per trial
    max_concurrent_trials: int = 0  # 0 = as many whole trials as the cluster holds (see module doc)
    asha: bool = False  # ASHA early stopping, a rung after each stage of a trial
    asha_grace_period: int = 1  # stages every trial runs before ASHA may stop it

    def validate(self) -> "SweepConfig":
        if self.search not in ("grid", "random"):
            raise ValueError(f"sweep: search must be 'grid' or 'random', got {self.search!r}")
        for name, low in (("alpha", 0.0), ("beta", 0.0)):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"sweep: {name} needs at least one value")
            bad = [v for v in values if not math.isfinite(v) or v < low or (name == "alpha" and v > 1.0)]
            if bad:
                valid = "[0, 1] (the realism metric's range)" if name == "alpha" else ">= 0"
                raise ValueError(f"sweep space: {name} must be {valid}, got {bad} in {list(values)}")
        if self.num_samples < 1:
            raise ValueError(f"sweep: num_samples must be >= 1, got {self.num_samples}")
        if self.max_concurrent_trials < 0:
            raise ValueError("sweep: max_concurrent_trials must be >= 0 (0 = automatic)")
        if self.asha_grace_period < 1:
            raise ValueError("sweep: asha_grace_period must be >= 1")
        return self

    def space(self) -> dict:
        """The Tune search space."""
        from ray import tune

        if self.search == "grid":
            return {"alpha": tune.grid_search(list(self.alpha)), "beta": tune.grid_search(list(self.beta))}
        return {"alpha": tune.uniform(min(self.alpha), max(self.alpha)),
                "beta": tune.uniform(min(self.beta), max(self.beta))}


def load_sweep_config(path: str | Path, changes: dict[str, Any] | None = None) -> SweepConfig:
    """Read a sweep YAML; `changes` (from the command line) replace its fields. A relative
    `pipeline` path is relative to the YAML's folder."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no such sweep config: {path}")
    raw = {**(yaml.safe_load(path.read_text()) or {}), **{k: v for k, v in (changes or {}).items() if v is not None}}
    known = {f.name for f in fields(SweepConfig)}
    if set(raw) - known:
        raise ValueError(f"sweep config: unknown field(s) {sorted(set(raw) - known)}; known: {sorted(known)}")
    if "pipeline" not in raw:
        raise ValueError("sweep config: 'pipeline' (the base pipeline YAML) is required")
    pipeline = Path(raw["pipeline"])
    raw["pipeline"] = str(pipeline if pipeline.is_absolute() or (changes or {}).get("pipeline") else path.parent / pipeline)
    for name in ("alpha", "beta"):
        value = raw.get(name, getattr(SweepConfig, name))
        raw[name] = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return SweepConfig(**raw).validate()


def split_stages(base: PipelineConfig, rft_stage: str) -> tuple[tuple[StageConfig, ...], tuple[StageConfig, ...]]:
    """(stages run once before the sweep, stages every trial runs)."""
    names = [s.name for s in base.stages]
    if rft_stage not in names:
        raise ValueError(f"sweep: rft_stage {rft_stage!r} is not a stage of the pipeline ({names})")
    if base.stage(rft_stage).kind != "mpo":
        raise ValueError(f"sweep: stage {rft_stage!r} is a {base.stage(rft_stage).kind} stage, not mpo")
    i = names.index(rft_stage)
    return base.stages[:i], base.stages[i:]


def trial_config(base: PipelineConfig, rft_stage: str, alpha: float, beta: float, out_dir: str) -> PipelineConfig:
    """The pipeline a trial runs: the RFT stage with this alpha/beta and the stages after it."""
    _, stages = split_stages(base, rft_stage)
    stages = tuple(dataclasses.replace(s, alpha=alpha, beta=beta) if s.name == rft_stage else s for s in stages)
    return dataclasses.replace(base, stages=stages, out_dir=out_dir)


def check_space(sweep: SweepConfig, base: PipelineConfig, checkpoint: str = "") -> None:
    """Every check that can fail before any trial starts (ValueError with a clear message)."""
    sweep.validate()
    before, _ = split_stages(base, sweep.rft_stage)
    for alpha in (min(sweep.alpha), max(sweep.alpha)):  # grid points and random ranges alike
        for beta in (min(sweep.beta), max(sweep.beta)):
            dataclasses.replace(trial_config(base, sweep.rft_stage, alpha, beta, base.out_dir),
                                init_checkpoint="").validate()
    if not checkpoint and not before:
        raise ValueError(f"sweep: no stage runs before {sweep.rft_stage!r}; give the shared SFT checkpoint "
                         "(--sft-checkpoint)")


def trial_resources(r: RayConfig):
    """A trial's placement group: an empty head bundle (the trial only drives) and one bundle
    per rollout actor; the learners come from Ray Train's own placement group."""
    from ray import tune

    actor = {"CPU": r.cpus_per_rollout_worker, "GPU": r.gpus_per_rollout_worker}
    return tune.PlacementGroupFactory([{}] + [actor] * r.num_rollout_workers)


def whole_trials(r: RayConfig, cluster: dict[str, float]) -> int:
    """How many trials, rollout actors and learners together, the cluster's resources hold (>= 1)."""
    need = {"CPU": r.num_rollout_workers * r.cpus_per_rollout_worker + r.num_learners * r.cpus_per_learner,
            "GPU": r.num_rollout_workers * r.gpus_per_rollout_worker + (r.num_learners if r.use_gpu else 0)}
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    return max(1, min(fits)) if fits else 1


def rank_key(row: dict) -> tuple:
    """Sort key, best first: meta metric (to 4 decimals), then collision + off-road, then minADE."""
    m = row["metrics"]
    return (-round(m["metametric"], 4), m["simulated_collision_rate"] + m["simulated_offroad_rate"],
            m["min_average_displacement_error"])


def best_row(rows: list[dict]) -> dict:
    """The best trial among those that finished every stage."""
    complete = [r for r in rows if r["status"] == "complete"]
    if not complete:
        raise RuntimeError("no trial of the sweep finished all its stages")
    return min(complete, key=rank_key)


def format_sweep_table(rows: list[dict]) -> str:
    """Markdown table, best first (finished trials, then stopped or failed ones)."""
    head = "| alpha | beta | realism meta | collision rate | off-road rate | minADE (m) | trial |"
    lines = [head, "|" + "---|" * 7]
    ordered = sorted(rows, key=lambda r: (r["status"] != "complete", rank_key(r) if r["metrics"] else ()))
    for r in ordered:
        m = r["metrics"]
        values = (f"{m['metametric']:.4f} | {m['simulated_collision_rate']:.4f} | {m['simulated_offroad_rate']:.4f} | "
                  f"{m['min_average_displacement_error']:.3f}" if m else "- | - | - | -")
        note = "" if r["status"] == "complete" else f" ({r['status']})"
        lines.append(f"| {r['alpha']:.3g} | {r['beta']:.3g} | {values} | {r['trial_id']}{note} |")
    return "\n".join(lines)


def resolve_shared(checkpoint: str, base: PipelineConfig, rft_stage: str) -> tuple[str, dict[str, str]]:
    """The given shared SFT checkpoint and data paths it comes with: a checkpoint file, or a
    pipeline run folder (its last finished stage before RFT and its generated data)."""
    path = Path(checkpoint).resolve()
    if not path.exists():
        raise ValueError(f"shared SFT checkpoint: no such file or run folder {checkpoint!r}")
    if path.is_file():
        return str(path), {}
    before, _ = split_stages(base, rft_stage)
    name = before[-1].name if before else "sft"
    done = path / name / "done.json"
    if not done.exists():
        raise ValueError(f"shared SFT checkpoint: {path} is not a pipeline run folder with a finished "
                         f"{name!r} stage ({done} is missing)")
    ckpt = path / name / "model.pt"  # where the pipeline puts it (done.json's path breaks if the folder moved)
    if not ckpt.exists():
        raise ValueError(f"shared SFT checkpoint: {ckpt} is missing")
    data = {d: str(path / "data" / d) for d in ("train", "heldout") if (path / "data" / d).exists()}
    return str(ckpt), data


def _identity(sweep: SweepConfig, base: PipelineConfig) -> dict:
    """What must not change between an interrupted sweep and its resumption."""
    space = {k: v for k, v in dataclasses.asdict(sweep).items() if k not in ("out_dir", "max_concurrent_trials")}
    pipeline = {k: v for k, v in base.to_dict().items() if k != "out_dir"}
    return json.loads(json.dumps({"sweep": space, "pipeline": pipeline}))


def preflight(sweep: SweepConfig, base: PipelineConfig, checkpoint: str = "") -> None:
    """Every check that can fail before any stage or trial starts; raises ValueError."""
    from smart_r1.tracking.mlflow_runs import check_tracking_uri, resolve_tracking_uri

    check_space(sweep, base, checkpoint)
    if checkpoint:
        resolve_shared(checkpoint, base, sweep.rft_stage)
    saved = Path(sweep.out_dir) / "sweep.json"
    if saved.exists() and json.loads(saved.read_text()) != _identity(sweep, base):
        raise ValueError(f"{sweep.out_dir} holds a sweep with a different search space or pipeline config "
                         f"({saved}); resume it with the same config or pick a new --out-dir")
    check_tracking_uri(resolve_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI")))


def nested_run(tracking_uri: str, parent_id: str, folder: Path, name: str):
    """(the MLflow run of `folder`, nested under `parent_id`; created on first use, True if new).

    Its id is stored as `<folder>/mlflow_run_id`, which `run_pipeline` resumes, so the stages a
    folder's pipeline runs nest under it, and a restarted trial keeps its run."""
    from smart_r1.tracking.mlflow_runs import RunTracker

    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / "mlflow_run_id"
    if id_file.exists():
        return RunTracker(tracking_uri, id_file.read_text().strip()), False
    tracker = RunTracker(tracking_uri, parent_id).child(name)
    tmp = id_file.with_name(".mlflow_run_id.tmp")
    tmp.write_text(tracker.run_id)
    os.replace(tmp, id_file)
    return tracker, True


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares (sent once through the object store by `tune.with_parameters`)."""

    base: PipelineConfig  # init_checkpoint = the shared SFT checkpoint; absolute data paths
    rft_stage: str
    trials_dir: str
    tracking_uri: str
    sweep_run_id: str


def run_trial(params: dict, setup: TrialSetup) -> None:
    """The Tune function trainable: RFT with this alpha/beta, then the later stages; one
    `tune.report` of held-out metrics per stage."""
    from ray import tune

    from smart_r1.distributed.pipeline import run_pipeline

    alpha, beta = float(params["alpha"]), float(params["beta"])
    trial_id = tune.get_context().get_trial_id()  # kept by Tuner.restore: a restarted trial finds its folder
    out = Path(setup.trials_dir) / f"{trial_id}_alpha={alpha:.4g}_beta={beta:.4g}"
    config = trial_config(setup.base, setup.rft_stage, alpha, beta, str(out))
    # run_pipeline reads the tracking URI from the environment, and a trial's process on a
    # cluster node does not inherit the driver's
    os.environ["MLFLOW_TRACKING_URI"] = setup.tracking_uri
    tracker, new = nested_run(setup.tracking_uri, setup.sweep_run_id, out, f"trial {trial_id}")
    if new:
        tracker.log_params({"alpha": alpha, "beta": beta, "trial_id": trial_id, "config": config.to_dict()})
    print(f"[sweep] trial {trial_id} starts: alpha={alpha:.4g} beta={beta:.4g} in {out}", flush=True)
    for k, stage in enumerate(config.stages):
        rows = run_pipeline(dataclasses.replace(config, stages=config.stages[: k + 1]))
        metrics = {key: float(rows[stage.name]["heldout"][key]) for key in METRICS}
        tracker.log_metrics({f"heldout/{key}": v for key, v in metrics.items()}, step=k)
        tune.report({**metrics, "stage": stage.name, "complete": k + 1 == len(config.stages)})


def trial_row(result) -> dict:
    """One trial of a ResultGrid as a plain row (its last report)."""
    m = result.metrics or {}
    metrics = {k: float(m[k]) for k in METRICS} if all(k in m for k in METRICS) else None
    if result.error is not None:
        status = "error"
    elif m.get("complete"):
        status = "complete"
    else:
        status = f"stopped after {m.get('stage', 'start')}"
    return {"trial_id": m.get("trial_id") or Path(result.path).name, "alpha": float(result.config["alpha"]),
            "beta": float(result.config["beta"]), "status": status, "metrics": metrics}


def shared_base(sweep: SweepConfig, base: PipelineConfig, out: Path, checkpoint: str, tracker) -> PipelineConfig:
    """The pipeline config trials start from: the shared SFT checkpoint (given, or made here once
    by the stages before RFT) and absolute data paths, so that no trial prepares data again."""
    from smart_r1.distributed.pipeline import prepare_data, run_pipeline

    before, _ = split_stages(base, sweep.rft_stage)
    base_dir = out / "base"
    data = dataclasses.replace(base.data, **{k: str(Path(v).resolve()) for k, v in
                                             (("train", base.data.train), ("heldout", base.data.heldout)) if v})
    if checkpoint:
        ckpt, found = resolve_shared(checkpoint, base, sweep.rft_stage)
        data = dataclasses.replace(data, **{k: v for k, v in found.items() if not getattr(base.data, k)})
        datasets = prepare_data(dataclasses.replace(base, data=data), base_dir)
    else:
        config = dataclasses.replace(base, data=data, out_dir=str(base_dir), stages=before)
        nested_run(tracker.tracking_uri, tracker.run_id, base_dir, "shared stages")
        print(f"[sweep] shared stages {[s.name for s in before]} in {base_dir} (skipped where finished)", flush=True)
        run_pipeline(config)
        ckpt = json.loads((base_dir / before[-1].name / "done.json").read_text())["checkpoint"]
        datasets = prepare_data(config, base_dir)
    data = dataclasses.replace(data, train=datasets["train"], heldout=datasets["heldout"])
    return dataclasses.replace(base, data=data, init_checkpoint=ckpt).validate()


def run_sweep(sweep: SweepConfig, base: PipelineConfig, checkpoint: str = "") -> list[dict]:
    """Run (or resume) the sweep; returns its rows and writes results.{md,json} and best.json
    to the sweep folder. Ray must be initialised."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from smart_r1.tracking.mlflow_runs import start_run

    preflight(sweep, base, checkpoint)
    out = Path(sweep.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(_identity(sweep, base), indent=2))
    id_file = out / "mlflow_run_id"  # a resumed sweep keeps its MLflow run
    resumed = id_file.exists()
    tracker = start_run(out.name, run_id=id_file.read_text().strip() if resumed else None)
    id_file.write_text(tracker.run_id)
    if not resumed:
        tracker.log_params({"sweep": dataclasses.asdict(sweep), "pipeline": base.to_dict()})
    trial_base = shared_base(sweep, base, out, checkpoint, tracker)
    setup = TrialSetup(trial_base, sweep.rft_stage, str(out / "trials"), tracker.tracking_uri, tracker.run_id)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), trial_resources(base.ray))
    path = out / "tune" / "sweep"
    if tune.Tuner.can_restore(path):
        print(f"[sweep] resuming {path}: finished trials are kept", flush=True)
        # Errored trials (already retried by FailureConfig) stay errored: Tune starts every
        # restored unfinished trial at once, and the search algorithm's concurrency cap only
        # bounds those (it limits trials alive at a time), not extra errored ones on top.
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=False)
    else:
        cluster = ray.cluster_resources()
        concurrent = sweep.max_concurrent_trials or whole_trials(base.ray, cluster)
        r = base.ray
        if r.num_rollout_workers * r.cpus_per_rollout_worker + r.num_learners * r.cpus_per_learner > cluster.get("CPU", 0):
            print(f"[sweep] warning: one trial needs more CPUs than the cluster has now ({cluster.get('CPU', 0):g}); "
                  "it waits for the autoscaler (or forever on a fixed machine: lower ray.cpus_* in the config)",
                  flush=True)
        _, stages = split_stages(base, sweep.rft_stage)
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=len(stages),
                                   grace_period=sweep.asha_grace_period, reduction_factor=2)
                     if sweep.asha else None)
        print(f"[sweep] {sweep.search} search, up to {concurrent} trial(s) at a time", flush=True)
        tuner = tune.Tuner(
            trainable, param_space=sweep.space(),
            tune_config=tune.TuneConfig(metric="metametric", mode="max", num_samples=sweep.num_samples,
                                        max_concurrent_trials=concurrent, scheduler=scheduler),
            # a retried trial continues from its last finished stage (and the learner from its last
            # checkpoint), so a trial killed by a node failure or the OOM killer costs little
            run_config=tune.RunConfig(name="sweep", storage_path=str(out / "tune"), verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=2)))
    rows = [trial_row(r) for r in tuner.fit()]
    table = format_sweep_table(rows)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    tracker.log_artifact(out / "results.md")
    failed = [r for r in rows if r["status"] == "error"]
    best = best_row(rows)
    record = {**best, "objective": "held-out realism meta metric after the last stage (max); ties at 4 "
                                   "decimals go to lower collision + off-road rate, then lower minADE",
              "overrides": [f"{sweep.rft_stage}.alpha={best['alpha']}", f"{sweep.rft_stage}.beta={best['beta']}"],
              "config": trial_config(trial_base, sweep.rft_stage, best["alpha"], best["beta"], "").to_dict()}
    (out / "best.json").write_text(json.dumps(record, indent=2))
    tracker.log_artifact(out / "best.json")
    tracker.log_metrics({"best_alpha": best["alpha"], "best_beta": best["beta"],
                         **{f"best_{k}": v for k, v in best["metrics"].items()}})
    tracker.finish("FAILED" if failed else "FINISHED")
    print(f"\n[sweep] {len(rows)} trials ({len(failed)} failed); results in {out}\n{table}\n"
          f"[sweep] best: alpha={best['alpha']:.4g} beta={best['beta']:.4g} "
          f"meta={best['metrics']['metametric']:.4f} -> {out / 'best.json'}", flush=True)
    return rows
