"""The stage DAG: BC -> closed-loop SFT (CAT-K) -> RFT (MPO) -> closed-loop SFT, on Ray.

The driver prepares data (the embedded SUMO set unless a path is given), the motion vocabulary
and an initial model, starts the rollout workers once, then runs each stage on a Ray Train
learner and scores its checkpoint on held-out scenarios with the rollout workers. Everything a
stage produces lives in `<out_dir>/<stage>/`; `done.json` marks a finished stage, so a re-run
skips finished stages and continues an unfinished one from its last checkpoint.

`out_dir` is the run's storage root: a local folder or a URI (`s3://bucket/prefix?...`, `gs://`,
`file://`). Every artefact of the run (data, `init.pt`, stage folders, Ray Train's checkpoints
under `<out_dir>/ray`, tables, run records) is read and written there through `smart_r1.storage`,
so a new driver, from any machine and working directory, resumes from what the root holds.

The supervised stages train on token shards made once, after the vocabulary and before the first
stage (`prepare_tokens`, under `<out_dir>/tokens/<vocab hash>/`): no learner tokenises.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import ray
import torch

from smart_r1.config import EvalConfig, PipelineConfig
from smart_r1.data.dataset import data_source, is_tfrecord, iter_scenarios
from smart_r1.data.preprocess import REPORT_NAME, convert_file, preprocess
from smart_r1.data.sumo import complete_dataset, make_dataset
from smart_r1.distributed.learner import run_learner
from smart_r1.distributed.resources import check_resources
from smart_r1.distributed.rollout_tasks import dispatch, gather
from smart_r1.distributed.rollout_worker import RolloutSpec, start_workers
from smart_r1.distributed.timing import PhaseTimer
from smart_r1.distributed.run_identity import INIT, check_run, record_stage
from smart_r1.distributed.worker_kit import MODEL_NAME, LearnerJob
from smart_r1.metrics import aggregate_metrics, step_events
from smart_r1.metrics.intervals import SCORES_FILE, headline_intervals, stage_differences
from smart_r1.metrics.tables import metrics_table
from smart_r1.model.checkpoint import checkpoint_bytes, load_checkpoint, load_weights, save_checkpoint
from smart_r1.model.config import ModelConfig
from smart_r1.model.precision import set_precision
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.rollout.policy import sample_states
from smart_r1.storage import (base_name, copy_file, display, exists, is_local, join, read_bytes, read_json,
                              remove_tree, resolve, root, write_json, write_text)
from smart_r1.tokens.cache import STAGE_OPTIONS, tokenize_dataset
from smart_r1.tokens.motion_vocab import build_vocab
from smart_r1.tracking.mlflow_runs import cluster_tracking_problem, folder_run, resolve_tracking_uri
from smart_r1.viz.render import render_scenario

SHARED_SCENARIO = Path(__file__).resolve().parents[2].parent / "shared" / "womd" / "motion_data_one_scenario.tfrecord"


GENERATED = "generated.json"  # beside generated shards in an object store: their size and seed
WORKERS_FILE = "rollout_workers.json"  # the rollout actors' peak resident memory (MB), for sizing them


def prepare_data(config: PipelineConfig, out: str | Path) -> dict[str, str]:
    """Data paths by name: train, heldout and (when available) the real WOMD scenario. Generated
    sets go to `<out>/data/<name>` (a local folder, or a URI under an object-store root)."""
    data = config.data
    paths = {"train": data.train, "heldout": data.heldout}
    for name, count, seed in (("train", data.embedded_train_scenarios, data.seed),
                              ("heldout", data.embedded_heldout_scenarios, data.seed + 100_000)):
        if paths[name]:
            continue
        if not is_local(out):
            paths[name] = generate_into_store(join(out, "data", name), name, count, seed)
            continue
        data_dir = Path(resolve(out)[1]) / "data"
        raw, parquet = data_dir / f"{name}_raw", data_dir / name
        if not complete_dataset(raw, count, seed):  # absent, interrupted, or of another size / seed
            print(f"[data] generating {count} SUMO scenarios ({name}, seed {seed}) ...", flush=True)
            for folder in (raw, parquet):
                shutil.rmtree(folder, ignore_errors=True)
            make_dataset(raw, num_scenarios=count, seed=seed)
        if not (parquet / REPORT_NAME).exists():  # written last; an interrupted run resumes per shard
            report = preprocess(str(raw / "*.tfrecord"), parquet, verbose=False)
            if report["bad_records"]:
                raise RuntimeError(f"generated data has bad records: {report['bad_records'][:3]}")
        paths[name] = str(parquet)
    real = data.real_scenario
    if real == "auto":
        real = str(SHARED_SCENARIO) if SHARED_SCENARIO.exists() else ""
    if real:
        paths["real"] = real
    return paths


def generate_into_store(parquet: str, name: str, count: int, seed: int) -> str:
    """The embedded SUMO set for a run whose root is an object store: generated in a local
    temporary folder (deterministic: the same seed gives the same files) and converted here, on
    the driver, file by file into shards at `parquet` (no Ray task on another node could read the
    temporary folder). `generated.json` (size and seed) goes first and the preprocessing report
    last, so an interrupted run resumes per shard and a set of another size or seed is remade.
    Returns `parquet`."""
    wanted = {"scenarios": count, "seed": seed}
    made = read_json(join(parquet, GENERATED), None)
    if made == wanted and exists(join(parquet, REPORT_NAME)):
        return parquet
    if made != wanted:  # absent, or shards of another size / seed
        remove_tree(parquet)
        write_json(join(parquet, GENERATED), wanted)
    print(f"[data] generating {count} SUMO scenarios ({name}, seed {seed}) into {display(parquet)} ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="smart_r1_sumo_") as tmp:
        make_dataset(tmp, num_scenarios=count, seed=seed)
        results = [convert_file(str(path), parquet) for path in sorted(Path(tmp).glob("*.tfrecord"))]
    bad = [asdict(b) for r in results for b in r.bad]
    if bad:
        raise RuntimeError(f"generated data has bad records: {bad[:3]}")
    write_json(join(parquet, REPORT_NAME), {"files": len(results), "files_skipped": sum(r.skipped for r in results),
                                            "scenarios": sum(r.scenarios for r in results), "bad_records": [],
                                            "shards": [display(r.shard) for r in results]})
    return parquet


def prepare_model(config: PipelineConfig, datasets: dict[str, str], out: str | Path) -> str:
    """The checkpoint the first stage starts from: the given one, or a fresh model with a
    motion vocabulary built from the training data, saved as `<out>/init.pt`."""
    if config.init_checkpoint:
        return config.init_checkpoint
    init = join(out, "init.pt")
    if not exists(init):
        t0 = time.perf_counter()
        m = config.model
        vocab = build_vocab(iter_scenarios(datasets["train"], m.vocab_scenarios), size=m.vocab_size, seed=config.seed,
                            max_samples=m.vocab_samples)
        torch.manual_seed(config.seed)
        cfg = ModelConfig.preset(config.model.preset, vocab_size=config.model.vocab_size)
        model = SmartTiny(cfg, vocab)
        save_checkpoint(init, model, {"stage": "init"})  # atomically, local or in a bucket
        print(f"[init] vocabulary of {vocab.size} tokens per type and a {model.num_parameters():,}-parameter "
              f"model ({config.model.preset}) in {time.perf_counter() - t0:.0f}s", flush=True)
    return init


def prepare_tokens(config: PipelineConfig, datasets: dict[str, str], out: str, checkpoint: str) -> dict[str, str]:
    """Token-shard folders by stage kind ("bc", "catk_sft") for the unfinished supervised stages:
    the training shards tokenised once with `checkpoint`'s vocabulary (every stage shares it),
    reused when a folder is complete (`smart_r1.tokens.cache`), under `data.tokens_root` (default:
    the run's root `out`). {} when no unfinished stage needs
    them, or when the training data are TFRecords (the learners then tokenise as they read)."""
    kinds = {s.kind for s in config.stages if s.kind in STAGE_OPTIONS and not exists(join(out, s.name, "done.json"))
             and not (s.kind == "bc" and config.init_checkpoint)}
    if not kinds:
        return {}
    if is_tfrecord(data_source(datasets["train"])):
        print("[tokens] data.train names TFRecords: the learners tokenise as they read "
              "(`smart-r1 preprocess` it to Parquet shards to tokenise once)", flush=True)
        return {}
    vocab = load_checkpoint(read_bytes(checkpoint)).vocab
    options = {kind: STAGE_OPTIONS[kind] for kind in sorted(kinds)}
    folders = tokenize_dataset(datasets["train"], config.data.tokens_root or out, vocab, list(options.values()))
    return {kind: folders[o] for kind, o in options.items()}


def score_checkpoint(workers: list, checkpoint: str, version: int, dataset: str, cfg: EvalConfig,
                     timeout_s: float = 1800.0, stage_dir: str | Path | None = None,
                     scenes_per_batch: int = 1, seed: int = 0) -> dict:
    """Fast WOSAC metrics of a checkpoint on (the first `cfg.max_scenarios` scenarios of) a
    dataset, sampled as `cfg` says, scored by the rollout workers, aggregated as the official
    code does, with a 95% bootstrap interval over scenarios beside each headline figure
    (`<field>_ci95`). The per-scenario metrics go to `<stage_dir>/scores_<dataset>.json`, which
    the paired stage differences and `smart-r1 compare-runs` read. `checkpoint` and `stage_dir`
    are local paths or URIs; an actor simulates up to `scenes_per_batch` scenarios in one batch.
    The rollouts are drawn from `seed` and each scenario's index alone: the same checkpoint scores
    the same whatever actor drew what, and every stage of a run is scored with the same per-scenario
    seeds (common random numbers: the paired stage differences carry less sampling noise)."""
    ref = ray.put(load_weights(read_bytes(checkpoint)))
    count = min(cfg.max_scenarios, ray.get(workers[0].num_scenarios.remote(dataset), timeout=timeout_s))
    spec = RolloutSpec(num_rollouts=cfg.num_rollouts, sampling=cfg.sampling, scenes_per_batch=scenes_per_batch,
                       seed=seed)
    queue = dispatch(workers, "score_scenarios", list(range(count)), version, [ref], dataset, spec,
                     per_call=scenes_per_batch)
    scored, failed = gather(queue, timeout_s, f"scoring on {dataset}")
    for message in failed:
        print(f"[eval] dropped: {message}", flush=True)
    if not scored:
        raise RuntimeError(f"evaluation on {dataset}: every scenario failed")
    summary = aggregate_metrics([{k: v for k, v in r.items() if k != "scenario_id"} for r in scored])
    if stage_dir is not None:
        write_json(join(stage_dir, SCORES_FILE.format(dataset=dataset)),
                   {"dataset": dataset, "checkpoint": display(checkpoint), "num_rollouts": cfg.num_rollouts,
                    "failed": failed, "records": scored})
    return {**summary, **headline_intervals(scored), "scenarios": len(scored), "failed": len(failed),
            "num_rollouts": cfg.num_rollouts}


def render_stage(checkpoint: str, data: str, out_path: str | Path, cfg: EvalConfig, seed: int = 0) -> str:
    """One sampled rollout of the first held-out scenario, drawn for the stage's MLflow run:
    rendered to a local temporary file, then stored at `out_path` (a local path or a URI)."""
    record = next(iter_scenarios(data, 1))
    model = load_checkpoint(read_bytes(checkpoint), "cuda" if torch.cuda.is_available() else "cpu")
    states = sample_states(model, record, 1, seed, cfg.sampling)
    with tempfile.TemporaryDirectory() as tmp:
        image = render_scenario(record, states, Path(tmp) / base_name(out_path), events=step_events(record, states[0]))
        copy_file(image, out_path)
    return str(out_path)


def paired_differences(out: str, stages: list[str], datasets: list[str]) -> str:
    """`stage_differences` of the stages' score files in the run's storage (local or a bucket)."""
    return stage_differences({s: join(out, s) for s in stages}, datasets)


def stage_table(rows: dict[str, dict[str, dict]]) -> str:
    """Markdown table: one row per (stage, dataset), each headline figure with its 95% interval
    over scenarios where the metrics carry one."""
    return metrics_table(("stage", "data"), [((stage, dataset, m["scenarios"], m.get("num_rollouts", "-")), m)
                                             for stage, by_data in rows.items() for dataset, m in by_data.items()],
                         trailing=("scenarios", "rollouts"))


def run_pipeline(config: PipelineConfig, fail_once_at: dict[str, int] | None = None) -> dict:
    """Run (or resume) every stage; returns {stage: {dataset: metrics}}."""
    started = time.perf_counter()
    set_precision(config.model.precision)  # this process's own forward passes (render); learners and actors get it in their spec
    check_resources(config.ray)
    problem = cluster_tracking_problem(ray.nodes(), resolve_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI")),
                                       ray.get_runtime_context().get_node_id())
    if problem:  # before any stage: learners on other nodes could not log to a file on this one
        raise ValueError(problem)
    check_run(config)  # never mixes results of another config (see run_identity)
    out = root(config.out_dir)  # the run's storage root: an absolute local folder, or a URI
    if is_local(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    write_json(join(out, "config.json"), config.to_dict())
    tracker, new = folder_run(out, base_name(out))  # a re-run resumes the same MLflow run
    if new:
        tracker.log_params(config.to_dict())
    timer = PhaseTimer()
    with timer.phase("data"):
        datasets = prepare_data(config, out)
        record_stage(config, INIT)
        current = prepare_model(config, datasets, out)
    with timer.phase("tokens"):
        scenes = prepare_tokens(config, datasets, out, current)
    eval_sets = [d for d in ("heldout", "real") if d in datasets]
    r = config.ray
    # Weights travel through Ray's object store: the driver reads each checkpoint once (CRC-checked)
    # and puts its bytes there; learners and rollout actors get the ObjectRef, never a path.
    refs: dict[str, ray.ObjectRef] = {}

    def weights(path: str) -> ray.ObjectRef:
        if path not in refs:
            refs[path] = ray.put(checkpoint_bytes(path))
        return refs[path]

    workers = start_workers(weights(current), datasets, r.num_rollout_workers, r.cpus_per_rollout_worker,
                            r.gpus_per_rollout_worker, config.seed, r.max_actor_restarts, config.model.precision)
    storage = r.storage_path or join(out, "ray")  # Ray Train's checkpoints: in the same root by default
    rows: dict[str, dict] = {}
    reference = current
    for i, stage in enumerate(config.stages):
        stage_dir = join(out, stage.name)
        done = join(stage_dir, "done.json")
        if stage.kind == "bc" and config.init_checkpoint:
            print(f"[{stage.name}] skipped: starting from {config.init_checkpoint}", flush=True)
            continue
        if exists(done):
            current, rows[stage.name] = join(stage_dir, MODEL_NAME), read_json(done)["metrics"]
            print(f"[{stage.name}] already finished: {display(current)}", flush=True)
            if stage.kind != "mpo":
                reference = current
            continue
        if is_local(stage_dir):
            Path(stage_dir).mkdir(parents=True, exist_ok=True)
        fingerprint = record_stage(config, stage.name)
        stage_tracker = tracker.child(stage.name)
        stage_tracker.log_params(asdict(stage))
        print(f"[{stage.name}] {stage.kind} from {display(current)}", flush=True)
        t0 = time.perf_counter()
        job = LearnerJob(stage=stage, stage_dir=stage_dir, init_checkpoint=weights(current), datasets=datasets,
                         scenes=scenes.get(stage.kind, ""),
                         seed=config.seed, ref_checkpoint=weights(reference) if stage.kind == "mpo" else "",
                         rollout_workers=workers if stage.kind == "mpo" else [], tracker=stage_tracker,
                         threads=r.learner_threads or max(1, int(r.cpus_per_learner)),
                         fail_once_at=(fail_once_at or {}).get(stage.name, -1),
                         run_name=f"{base_name(out)}-{stage.name}-{fingerprint}", task_timeout_s=r.task_timeout_s,
                         scenes_per_batch=r.scenarios_per_rollout_batch, precision=config.model.precision)
        with timer.phase(f"stage_{stage.name}"):
            current = run_learner(job, r, storage)
        with timer.phase("eval"):
            rows[stage.name] = {d: score_checkpoint(workers, current, 10**6 + i + 1, d, config.eval,
                                                    r.task_timeout_s, stage_dir, r.scenarios_per_rollout_batch,
                                                    seed=config.seed)
                                for d in eval_sets}
        seconds = time.perf_counter() - t0
        for d, m in rows[stage.name].items():
            stage_tracker.log_metrics({f"{d}/{k}": v for k, v in m.items()})
        write_json(join(stage_dir, "metrics.json"), rows[stage.name])
        stage_tracker.log_artifact(join(stage_dir, "metrics.json"))
        stage_tracker.log_artifact(current, "checkpoints")
        with timer.phase("render"):
            stage_tracker.log_artifact(render_stage(current, datasets["heldout"], join(stage_dir, "rollout.png"),
                                                    config.eval, config.seed), "plots")
        stage_tracker.finish()
        write_json(done, {"checkpoint": MODEL_NAME, "fingerprint": fingerprint, "metrics": rows[stage.name],
                          "seconds": seconds})
        if stage.kind != "mpo":
            reference = current  # MPO's KL anchors to the latest supervised checkpoint
        print(f"[{stage.name}] finished in {seconds:.0f}s\n{stage_table({stage.name: rows[stage.name]})}",
              flush=True)
    # Paired differences from the stages' score files (a resumed run reads those of earlier runs).
    differences = paired_differences(out, list(rows), eval_sets)
    table = (f"{stage_table(rows)}\n\nPaired differences between consecutive stages (later - earlier), "
             f"95% bootstrap over the scenarios both scored; * the interval excludes 0:\n\n{differences}")
    write_text(join(out, "results.md"), table + "\n")
    write_json(join(out, "results.json"), rows)
    tracker.log_artifact(join(out, "results.md"))
    tracker.log_metrics({k: v for k, v in timer.lap().items()})
    tracker.finish()
    try:  # a record for sizing the actors; a lost actor must not fail a finished run
        peaks = [i["peak_rss_mb"] for i in ray.get([w.info.remote() for w in workers], timeout=r.task_timeout_s)]
        write_json(join(out, WORKERS_FILE), {"peak_rss_mb": peaks})
    except ray.exceptions.RayError as e:
        print(f"[memory] rollout workers' peak memory not recorded: {type(e).__name__}", flush=True)
    for w in workers:
        ray.kill(w)
    print(f"\nSFT-RFT-SFT finished in {time.perf_counter() - started:.0f}s; results in {display(out)}\n{table}",
          flush=True)
    return rows
