"""The stage DAG: BC -> closed-loop SFT (CAT-K) -> RFT (MPO) -> closed-loop SFT, on Ray.

The driver prepares data (the embedded SUMO set unless a path is given), the motion vocabulary
and an initial model, then runs each stage on a Ray Train learner and scores its checkpoint on
held-out scenarios with the rollout workers. Rollout actors live only while a stage uses them (an
MPO stage and the evaluation after it, the evaluation after a supervised stage): they are started
for it and killed before a supervised stage's learners start, so an autoscaling cluster can
release its CPU nodes during BC and SFT (`RolloutActors`). Everything a stage produces lives in
`<out_dir>/<stage>/`; `done.json` marks a finished stage, so a re-run skips finished stages and
continues an unfinished one from its last checkpoint.

`out_dir` is the run's storage root: a local folder or a URI (`s3://bucket/prefix?...`, `gs://`,
`file://`). Every artefact of the run (data, `init.pt`, stage folders, Ray Train's run records
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

from smart_r1.config import EvalConfig, PipelineConfig, parse_train_data
from smart_r1.data.dataset import data_source, is_tfrecord, iter_scenarios
from smart_r1.data.preprocess import REPORT_NAME, convert_file, preprocess
from smart_r1.data.splits import split_real_scenes
from smart_r1.data.sumo import SumoConfig, complete_dataset, make_dataset
from smart_r1.distributed.learner import run_learner
from smart_r1.distributed.resources import check_resources
from smart_r1.distributed.rollout_tasks import dispatch, gather
from smart_r1.distributed.rollout_worker import RolloutSpec, start_workers
from smart_r1.distributed.timing import PhaseTimer
from smart_r1.distributed.run_identity import INIT, check_run, record_stage
from smart_r1.distributed.worker_kit import MODEL_NAME, LearnerJob
from smart_r1.metrics import aggregate_metrics, step_events
from smart_r1.metrics.intervals import SCORES_FILE, headline_intervals, stage_differences
from smart_r1.metrics.references import reference_scores, summary
from smart_r1.metrics.signals import mean_travel_ratio
from smart_r1.metrics.tables import metrics_table
from smart_r1.model.checkpoint import checkpoint_bytes, load_checkpoint, load_weights, save_checkpoint
from smart_r1.model.precision import set_precision
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.rollout.policy import sample_states
from smart_r1.storage import (base_name, copy_file, display, exists, is_local, join, read_bytes, read_json,
                              remove_tree, resolve, root, write_json, write_text)
from smart_r1.tokens.cache import STAGE_OPTIONS, tokenize_dataset
from smart_r1.tokens.motion_vocab import build_vocab
from smart_r1.tracking.mlflow_runs import cluster_tracking_problem, folder_run, resolve_tracking_uri
from smart_r1.viz.render import render_scenario

GENERATED = "generated.json"  # beside generated shards in an object store: their size, seed and sampling
WORKERS_FILE = "rollout_workers.json"  # the rollout actors' peak resident memory (MB), for sizing them
# A generated evaluation set has one scenario per network (networks are the independent units), each
# cut from a short simulation: 20 s of traffic after the warm-up leave enough windows to pick one.
EVAL_SUMO = SumoConfig(record_seconds=20.0)


def wanted_datasets(config: PipelineConfig) -> tuple[list[str], list[str]]:
    """(the data sets the stages train on, the data sets that score them), by name, as the config
    asks: real_* names only where data.real has scenes (auto without ../shared leaves them out)."""
    real = bool(config.data.real_source())
    training = []
    for stage in config.stages:
        training += [name for name, _ in parse_train_data(stage.train_data, stage.name) if name not in training]
    scoring = config.eval.names() or ((["real_report"] if real else [])
                                      + ["heldout" if config.data.heldout else "sumo_heldout"])
    keep = lambda names: [n for n in names if real or not n.startswith("real_")]  # noqa: E731
    return keep(training), keep(scoring)


def prepare_data(config: PipelineConfig, out: str | Path) -> dict[str, str]:
    """Data paths (local folders or URIs under `out`) by name (`smart_r1.config.DATASET_NAMES`), for
    every set the stages train on or are scored on: "train" (data.train, or generated SUMO),
    "heldout" (data.heldout), generated SUMO evaluation sets (one scenario per network, from
    networks of their own seed, so no training scene shares them), and the real WOMD splits of
    data.real. Generated and split sets go to `<root>/data/<name>`, root being data.generated_root
    (a sweep's shared folder) or `out`."""
    data = config.data
    out = data.generated_root or out
    training, scoring = wanted_datasets(config)
    wanted = set(training) | set(scoring)
    if data.real == "auto" and not data.real_source():
        print("[data] no real WOMD scenes (../shared/womd/real is absent): SUMO data only", flush=True)
    paths = {name: path for name, path in (("train", data.train), ("heldout", data.heldout)) if path}
    sumo = {"train": (data.embedded_train_scenarios, config.seed if data.seed is None else data.seed, 0),
            "sumo_heldout": (data.embedded_heldout_scenarios, data.heldout_seed, 1),
            "sumo_tune": (data.embedded_heldout_scenarios, data.heldout_seed + 100_000, 1)}
    for name, (count, seed, per_network) in sumo.items():
        if name in wanted and name not in paths:
            paths[name] = generate_sumo(out, name, count, seed, per_network)
    if any(n.startswith("real_") for n in wanted):
        splits = split_real_scenes(data.real_source(), join(out, "data", "real"))
        paths.update({f"real_{split}": folder for split, folder in splits.items()})
    missing = sorted(wanted - set(paths))
    if missing:
        raise ValueError(f"data sets {missing} are named by the config but empty (data.real's split has no scene)")
    return paths


def generate_sumo(out: str | Path, name: str, count: int, seed: int, per_network: int) -> str:
    """A generated SUMO set `<out>/data/<name>` as Parquet shards (the training set: every window of
    each network; an evaluation set: `per_network` scenarios per network, from short simulations)."""
    config = EVAL_SUMO if per_network else SumoConfig()
    if not is_local(out):
        return generate_into_store(join(out, "data", name), name, count, seed, per_network, config)
    data_dir = Path(resolve(out)[1]) / "data"
    raw, parquet = data_dir / f"{name}_raw", data_dir / name
    if not complete_dataset(raw, count, seed, per_network):  # absent, interrupted, or of another size / seed
        print(f"[data] generating {count} SUMO scenarios ({name}, seed {seed}"
              f"{f', {per_network} per network' if per_network else ''}) ...", flush=True)
        for folder in (raw, parquet):
            shutil.rmtree(folder, ignore_errors=True)
        make_dataset(raw, num_scenarios=count, seed=seed, config=config, per_network=per_network)
    if not (parquet / REPORT_NAME).exists():  # written last; an interrupted run resumes per shard
        report = preprocess(str(raw / "*.tfrecord"), parquet, verbose=False)
        if report["bad_records"]:
            raise RuntimeError(f"generated data has bad records: {report['bad_records'][:3]}")
    return str(parquet)


def generate_into_store(parquet: str, name: str, count: int, seed: int, per_network: int = 0,
                        config: SumoConfig = SumoConfig()) -> str:
    """The embedded SUMO set for a run whose root is an object store: generated in a local
    temporary folder (deterministic: the same seed gives the same files) and converted here, on
    the driver, file by file into shards at `parquet` (no Ray task on another node could read the
    temporary folder). `generated.json` (size, seed, scenarios per network) goes first and the
    preprocessing report last, so an interrupted run resumes per shard and a set of another size
    or seed is remade. Returns `parquet`."""
    wanted = {"scenarios": count, "seed": seed, "per_network": per_network}
    made = read_json(join(parquet, GENERATED), None)
    if made == wanted and exists(join(parquet, REPORT_NAME)):
        return parquet
    if made != wanted:  # absent, or shards of another size / seed
        remove_tree(parquet)
        write_json(join(parquet, GENERATED), wanted)
    print(f"[data] generating {count} SUMO scenarios ({name}, seed {seed}) into {display(parquet)} ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="smart_r1_sumo_") as tmp:
        make_dataset(tmp, num_scenarios=count, seed=seed, config=config, per_network=per_network)
        results = [convert_file(str(path), parquet) for path in sorted(Path(tmp).glob("*.tfrecord"))]
    bad = [asdict(b) for r in results for b in r.bad]
    if bad:
        raise RuntimeError(f"generated data has bad records: {bad[:3]}")
    write_json(join(parquet, REPORT_NAME), {"files": len(results), "files_skipped": sum(r.skipped for r in results),
                                            "scenarios": sum(r.scenarios for r in results), "bad_records": [],
                                            "shards": [display(r.shard) for r in results]})
    return parquet


def stage_mixture(stage, datasets: dict[str, str]) -> list[tuple[str, int]]:
    """[(data set name, repeats)] a stage learns from: its `train_data`, less the real_* sets that
    this run has none of (data.real auto without ../shared; `prepare_data` said so once)."""
    return [(name, k) for name, k in parse_train_data(stage.train_data, stage.name)
            if name in datasets or not name.startswith("real_")]


def mixture_sources(stage, datasets: dict[str, str]) -> str | list[str]:
    """The data a stage's rollout actors draw from: one data set's path, or for a mixture the
    paths of its sets, each repeated as often as `train_data` says (one index over them all)."""
    parts = [datasets[name] for name, k in stage_mixture(stage, datasets) for _ in range(k)]
    return parts[0] if len(parts) == 1 else parts


def interleaved_scenarios(paths: list[str], limit: int):
    """Up to `limit` scenarios taken from `paths` in turn (one of each, then the next of each, ...)."""
    streams = [iter_scenarios(p) for p in paths]
    taken = 0
    while streams and taken < limit:
        for stream in list(streams):
            record = next(stream, None)
            if record is None:
                streams.remove(stream)
                continue
            yield record
            taken += 1
            if taken >= limit:
                return


def prepare_model(config: PipelineConfig, datasets: dict[str, str], out: str | Path) -> str:
    """The checkpoint the first stage starts from: the given one, or a fresh model with a
    motion vocabulary built from the data the first stage learns from (its sets in turn), saved
    as `<out>/init.pt`."""
    if config.init_checkpoint:
        return config.init_checkpoint
    init = join(out, "init.pt")
    if not exists(init):
        t0 = time.perf_counter()
        m = config.model
        sources = [datasets[name] for name, _ in stage_mixture(config.stages[0], datasets)]
        vocab = build_vocab(interleaved_scenarios(sources, m.vocab_scenarios), size=m.vocab_size, seed=config.seed,
                            max_samples=m.vocab_samples)
        torch.manual_seed(config.seed)
        model = SmartTiny(config.model.model_config(), vocab)
        save_checkpoint(init, model, {"stage": "init"})  # atomically, local or in a bucket
        print(f"[init] vocabulary of {vocab.size} tokens per type and a {model.num_parameters():,}-parameter "
              f"model ({config.model.describe()}) in {time.perf_counter() - t0:.0f}s", flush=True)
    return init


def prepare_tokens(config: PipelineConfig, datasets: dict[str, str], out: str, checkpoint: str
                   ) -> dict[str, list[str]]:
    """Token-shard folders by stage name for the unfinished supervised stages: each data set a
    stage learns from, tokenised once with `checkpoint`'s vocabulary (every stage shares it) for
    the stage's kind, listed as often as its `train_data` repeats it; reused when a folder is
    complete (`smart_r1.tokens.cache`), under `data.tokens_root` (default: the run's root `out`).
    {} when no unfinished stage needs them, or when the training data are TFRecords (the learners
    then tokenise as they read)."""
    stages = [s for s in config.stages if s.kind in STAGE_OPTIONS and not exists(join(out, s.name, "done.json"))
              and not (s.kind == "bc" and config.init_checkpoint)]
    if not stages:
        return {}
    if is_tfrecord(data_source(datasets["train"])):
        print("[tokens] data.train names TFRecords: the learners tokenise as they read "
              "(`smart-r1 preprocess` it to Parquet shards to tokenise once)", flush=True)
        return {}
    vocab = load_checkpoint(read_bytes(checkpoint)).vocab
    needed: dict[str, set] = {}  # data set -> scene options
    for stage in stages:
        for name, _ in stage_mixture(stage, datasets):
            needed.setdefault(name, set()).add(STAGE_OPTIONS[stage.kind])
    folders = {name: tokenize_dataset(datasets[name], config.data.tokens_root or out, vocab,
                                      sorted(options, key=lambda o: o.name), dataset=name)
               for name, options in needed.items()}
    return {stage.name: [folders[name][STAGE_OPTIONS[stage.kind]] for name, k in stage_mixture(stage, datasets)
                         for _ in range(k)] for stage in stages}


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
            "num_rollouts": cfg.num_rollouts, "travel_ratio": mean_travel_ratio(scored)}


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


REFERENCES_FILE = "references.json"  # in the run's root: the reference policies' metrics per evaluation set


def reference_rows(out: str, datasets: dict[str, str], eval_sets: list[str], cfg: EvalConfig) -> dict[str, dict]:
    """{data set: {policy: metrics}} of log replay and a stationary simulation on the scenarios each
    stage is scored on (`smart_r1.metrics.references`), computed here once per run and kept in
    `<out>/references.json`: the ceiling, and what a simulation that never moves scores."""
    path = join(out, REFERENCES_FILE)
    known = read_json(path, {})
    for d in eval_sets:
        if d not in known:
            scores = reference_scores(list(iter_scenarios(datasets[d], cfg.max_scenarios)), ("log replay", "stationary"))
            known[d] = {name: {**summary(scored), **headline_intervals(scored)} for name, scored in scores.items()}
            write_json(path, known)
    return {d: known[d] for d in eval_sets}


def paired_differences(out: str, stages: list[str], datasets: list[str]) -> str:
    """`stage_differences` of the stages' score files in the run's storage (local or a bucket)."""
    return stage_differences({s: join(out, s) for s in stages}, datasets)


def _ratio(m: dict) -> str:
    return "-" if m.get("travel_ratio") is None else f"{m['travel_ratio']:.2f}"


def stage_table(rows: dict[str, dict[str, dict]], labels: tuple[str, str] = ("stage", "data")) -> str:
    """Markdown table: one row per (stage, dataset), each headline figure with its 95% interval
    over scenes or networks where the metrics carry one, and the travel ratio (how far the agents
    go against the log: below 1, slower)."""
    return metrics_table(labels, [((stage, dataset, m["scenarios"], m.get("num_rollouts", "-"), _ratio(m)), m)
                                  for stage, by_data in rows.items() for dataset, m in by_data.items()],
                         trailing=("scenarios", "rollouts", "travel ratio"))


class RolloutActors:
    """The pipeline's rollout actors, started when a stage needs them and killed when the next one
    does not (their CPUs, or GPU shares, go back to the cluster). Each set's peak resident memory
    is read before it is killed, for `<out_dir>/rollout_workers.json`."""

    def __init__(self, config: PipelineConfig, datasets: dict[str, str]):
        self.config, self.datasets = config, datasets
        self.handles: list = []
        self.peaks: list[list[float]] = []  # per set started: each actor's peak RSS (MB)

    def get(self, weights: ray.ObjectRef) -> list:
        """The actors, started now (holding `weights`) unless they are alive."""
        if not self.handles:
            r = self.config.ray
            self.handles = start_workers(weights, self.datasets, r.num_rollout_workers, r.cpus_per_rollout_worker,
                                         r.gpus_per_rollout_worker, self.config.seed, r.max_actor_restarts,
                                         self.config.model.precision)
        return self.handles

    def release(self) -> None:
        """Record the actors' peak memory, then kill them (nothing when none is alive)."""
        if not self.handles:
            return
        try:  # a record for sizing the actors; a lost actor must not fail the run
            infos = ray.get([w.info.remote() for w in self.handles], timeout=self.config.ray.task_timeout_s)
            self.peaks.append([i["peak_rss_mb"] for i in infos])
        except ray.exceptions.RayError as e:
            print(f"[memory] rollout workers' peak memory not recorded: {type(e).__name__}", flush=True)
        for w in self.handles:
            ray.kill(w)
        self.handles = []

    def record(self, out: str) -> None:
        """`<out>/rollout_workers.json`: each actor's peak over the sets this driver started, and each set's."""
        if self.peaks:
            write_json(join(out, WORKERS_FILE), {"peak_rss_mb": [max(p) for p in zip(*self.peaks)],
                                                 "per_start": self.peaks})


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
    eval_sets = wanted_datasets(config)[1]
    for stage in config.stages:  # an RFT stage's actors draw from its mixture (one index over its sets)
        if stage.kind == "mpo":
            datasets[stage.train_data] = mixture_sources(stage, datasets)
    r = config.ray
    # Weights travel through Ray's object store: the driver reads each checkpoint once (CRC-checked)
    # and puts its bytes there; learners and rollout actors get the ObjectRef, never a path.
    refs: dict[str, ray.ObjectRef] = {}

    def weights(path: str) -> ray.ObjectRef:
        if path not in refs:
            refs[path] = ray.put(checkpoint_bytes(path))
        return refs[path]

    actors = RolloutActors(config, datasets)

    def score_stage(checkpoint: str, index: int, stage_dir: str, sets: list[str]) -> dict[str, dict]:
        with timer.phase("eval"):
            workers = actors.get(weights(checkpoint))
            return {d: score_checkpoint(workers, checkpoint, 10**6 + index + 1, d, config.eval, r.task_timeout_s,
                                        stage_dir, r.scenarios_per_rollout_batch, seed=config.seed) for d in sets}
    storage = r.storage_path or join(out, "ray")  # Ray Train's run records: in the same root by default
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
            missing = [d for d in eval_sets if d not in rows[stage.name]]
            if missing:  # a set named after the stage finished (eval.datasets is no part of its fingerprint)
                print(f"[{stage.name}] scoring the finished stage on {', '.join(missing)}", flush=True)
                rows[stage.name].update(score_stage(current, i, stage_dir, missing))
                for d in missing:
                    tracker.log_metrics({f"{stage.name}/{d}/{k}": v for k, v in rows[stage.name][d].items()})
                write_json(join(stage_dir, "metrics.json"), rows[stage.name])
                write_json(done, {**read_json(done), "metrics": rows[stage.name]})
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
        if stage.kind != "mpo":  # the learners alone: the actors' resources go back to the cluster
            actors.release()
        job = LearnerJob(stage=stage, stage_dir=stage_dir, init_checkpoint=weights(current), datasets=datasets,
                         scenes=scenes.get(stage.name, []),
                         seed=config.seed, ref_checkpoint=weights(reference) if stage.kind == "mpo" else "",
                         # MPO samples through the actors (kept for the evaluation after it)
                         rollout_workers=actors.get(weights(current)) if stage.kind == "mpo" else [],
                         tracker=stage_tracker,
                         threads=r.learner_threads or max(1, int(r.cpus_per_learner)),
                         fail_once_at=(fail_once_at or {}).get(stage.name, -1),
                         run_name=f"{base_name(out)}-{stage.name}-{fingerprint}", task_timeout_s=r.task_timeout_s,
                         scenes_per_batch=r.scenarios_per_rollout_batch, precision=config.model.precision)
        with timer.phase(f"stage_{stage.name}"):
            current = run_learner(job, r, storage)
        rows[stage.name] = score_stage(current, i, stage_dir, eval_sets)
        seconds = time.perf_counter() - t0
        for d, m in rows[stage.name].items():
            stage_tracker.log_metrics({f"{d}/{k}": v for k, v in m.items()})
        write_json(join(stage_dir, "metrics.json"), rows[stage.name])
        stage_tracker.log_artifact(join(stage_dir, "metrics.json"))
        stage_tracker.log_artifact(current, "checkpoints")
        with timer.phase("render"):
            stage_tracker.log_artifact(render_stage(current, datasets[eval_sets[0]], join(stage_dir, "rollout.png"),
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
    with timer.phase("references"):
        references = reference_rows(out, datasets, eval_sets, config.eval)
    table = (f"{stage_table(rows)}\n\nPaired differences between consecutive stages (later - earlier), "
             f"95% bootstrap over the scenes or networks both scored; * the interval excludes 0:\n\n{differences}"
             f"\n\nModel-free references on the same scenarios (log replay: the ceiling; stationary: every agent "
             f"stays put, what a simulation that never moves scores):\n\n{stage_table(references, ('data', 'policy'))}")
    write_text(join(out, "results.md"), table + "\n")
    write_json(join(out, "results.json"), rows)
    tracker.log_artifact(join(out, "results.md"))
    tracker.log_metrics({k: v for k, v in timer.lap().items()})
    tracker.finish()
    actors.release()
    actors.record(out)
    print(f"\nSFT-RFT-SFT finished in {time.perf_counter() - started:.0f}s; results in {display(out)}\n{table}",
          flush=True)
    return rows
