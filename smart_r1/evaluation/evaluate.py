"""Score a simulator on a dataset, and export its rollouts for the WOSAC leaderboard.

    evaluate            rollouts of every scenario (from a checkpoint, or read from a submission
                        file) -> per-scenario WOSAC metrics (fast PyTorch, or the official
                        evaluator over Ray) -> leaderboard table, JSON, MLflow, a few renders
    export_submission   32 closed-loop rollouts per scenario -> checked submission shards, tar.gz

Every input problem (a checkpoint that does not load, a folder without scenarios, rollouts of
other scenarios) is raised as a ValueError / FileNotFoundError whose message says what is wrong;
the CLI prints it and exits non-zero.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from smart_r1.evaluation.leaderboard import Leaderboard, leaderboard
from smart_r1.types import ScenarioRecord

NUM_SUBMISSION_ROLLOUTS = 32  # what the challenge requires per scenario
_OFFICIAL_CHUNK = 8  # scenarios per call of the Ray evaluator (the progress bar moves per chunk)


@dataclass(frozen=True)
class EvaluateConfig:
    """What `evaluate` does. Exactly one of `checkpoint` and `rollouts` is set.

    checkpoint: SMART-tiny checkpoint to roll out; rollouts: a ScenarioRollouts /
        SimAgentsChallengeSubmission binproto or submission tar.gz to score instead
    data: Parquet folder or TFRecord file / glob
    num_rollouts: joint rollouts per scenario (checkpoint mode)
    official: score with Waymo's evaluator (slow, Ray) instead of the fast re-implementation
    out: results JSON path (renders go beside it, in `<stem>_renders/`)
    num_renders: scenarios drawn (rollout 0) and attached to the active MLflow run
    max_scenarios: evaluate only the first N scenarios
    seed: sampling seed
    top_k, temperature: how the model samples its tokens (top_k 0: the whole vocabulary)
    """

    data: str
    checkpoint: str | None = None
    rollouts: str | None = None
    num_rollouts: int = 32
    official: bool = False
    out: str | None = None
    num_renders: int = 2
    max_scenarios: int | None = None
    seed: int = 0
    top_k: int = 0
    temperature: float = 1.0

    def validate(self) -> "EvaluateConfig":
        if (self.checkpoint is None) == (self.rollouts is None):
            raise ValueError("give either a checkpoint to roll out or a rollouts file to score")
        if self.num_rollouts < 1:
            raise ValueError(f"num_rollouts must be at least 1, got {self.num_rollouts}")
        return self


@dataclass(frozen=True)
class EvaluationResult:
    """leaderboard: the dataset's row; per_scenario: [{"scenario_id", SimAgentMetrics fields}]."""

    leaderboard: Leaderboard
    per_scenario: list[dict]
    evaluator: str
    seconds: float

    def to_dict(self) -> dict:
        return {"leaderboard": self.leaderboard.to_dict(), "evaluator": self.evaluator,
                "seconds": self.seconds, "per_scenario": self.per_scenario}


def load_model(checkpoint: str | Path):
    """The SMART-tiny model of a checkpoint, on the GPU when there is one; ValueError if it fails."""
    import torch

    from smart_r1.model.checkpoint import load_checkpoint

    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    try:
        return load_checkpoint(checkpoint, "cuda" if torch.cuda.is_available() else "cpu")
    except Exception as e:  # torch.load raises many types on a damaged or foreign file
        raise ValueError(f"checkpoint {checkpoint} does not load: {type(e).__name__}: {e}") from e


def count_scenarios(data: str | Path) -> int:
    """How many scenarios `data` holds, without parsing them (for the progress bar's ETA)."""
    text = str(data)
    if ".tfrecord" in text:
        from smart_r1.data.preprocess import expand_inputs
        from smart_r1.data.tfrecord import read_records

        return sum(1 for path in expand_inputs(text) for _ in read_records(path))
    import pyarrow.parquet as pq

    from smart_r1.data.parquet import shard_paths

    return sum(pq.ParquetFile(path).metadata.num_rows for path in shard_paths(data))


def scenarios(data: str | Path, limit: int | None = None) -> tuple[int, Iterator[ScenarioRecord]]:
    """(count, iterator) of the dataset's scenarios; ValueError when there is none."""
    from smart_r1.data.dataset import iter_scenarios

    total = count_scenarios(data)
    if limit is not None:
        total = min(total, limit)
    if total == 0:
        raise ValueError(f"{data} holds no scenario")
    return total, iter_scenarios(data, limit)


def model_states(model, record: ScenarioRecord, num_rollouts: int, seed: int, top_k: int = 0,
                 temperature: float = 1.0) -> np.ndarray:
    """float [R, S, 80, 4]: closed-loop rollouts of one scenario, sim agents in record order."""
    import torch

    from smart_r1.rollout.closed_loop import rollout_records
    from smart_r1.rollout.sampling import Sampler

    generator = torch.Generator(device=model.device).manual_seed(seed)
    sampler = Sampler(top_k=top_k, temperature=temperature, generator=generator)
    (rollout,) = rollout_records(model, [record], num_rollouts, sampler)
    if rollout.scenario_id != record.scenario_id or not np.array_equal(rollout.agent_ids, record.sim_agent_ids):
        raise ValueError(f"scenario {record.scenario_id}: the model's rollouts are for scenario "
                         f"{rollout.scenario_id} / other agents")
    return rollout.states


class _RolloutSource:
    """Rollout states per scenario: from a model, or from a rollouts file matched by scenario id."""

    def __init__(self, cfg: EvaluateConfig):
        self.cfg = cfg
        self.model = load_model(cfg.checkpoint) if cfg.checkpoint else None
        self.protos = {}
        if cfg.rollouts:
            from smart_r1.evaluation.submission import read_rollouts

            self.protos = {r.scenario_id: r for r in read_rollouts(cfg.rollouts)}
        self.used: set[str] = set()

    def states(self, index: int, record: ScenarioRecord) -> np.ndarray:
        if self.model is not None:
            return model_states(self.model, record, self.cfg.num_rollouts, self.cfg.seed + index,
                                self.cfg.top_k, self.cfg.temperature)
        from smart_r1.metrics.rollouts_io import scenario_rollouts_to_states

        proto = self.protos.get(record.scenario_id)
        if proto is None:
            raise ValueError(f"{self.cfg.rollouts} has no rollouts for scenario {record.scenario_id} of "
                             f"{self.cfg.data} (it has rollouts for {sorted(self.protos)[:5]})")
        self.used.add(record.scenario_id)
        return scenario_rollouts_to_states(record, proto)


def _score_fast(record: ScenarioRecord, states: np.ndarray) -> dict[str, float]:
    from smart_r1.metrics import compute_scenario_metrics

    return compute_scenario_metrics(record, states)


def _score_official(pairs: list[tuple[ScenarioRecord, np.ndarray]]) -> list[dict[str, float]]:
    from smart_r1.metrics.official import official_metrics_parallel
    from smart_r1.metrics.rollouts_io import states_to_scenario_rollouts

    return official_metrics_parallel([(rec, states_to_scenario_rollouts(rec, st)) for rec, st in pairs])


def _render(pairs: list[tuple[ScenarioRecord, np.ndarray]], folder: Path) -> list[Path]:
    from smart_r1.viz.render import render_scenario

    return [render_scenario(rec, st, folder / f"{rec.scenario_id}.png") for rec, st in pairs]


def _log_to_mlflow(result: EvaluationResult, renders: list[Path]) -> bool:
    """Log the table, the JSON and the renders to the active MLflow run; False when none is active."""
    import mlflow

    if mlflow.active_run() is None:
        return False
    prefix = "eval_official/" if result.evaluator == "official" else "eval/"
    mlflow.log_metrics({prefix + k: float(v) for k, v in result.leaderboard.to_dict().items()})
    mlflow.log_dict(result.to_dict(), "evaluation/results.json")
    for path in renders:
        mlflow.log_artifact(str(path), "evaluation/renders")
    return True


def evaluate(cfg: EvaluateConfig, progress: bool = True) -> tuple[EvaluationResult, list[Path]]:
    """Roll out (or read) and score every scenario; write JSON and renders; log to MLflow.

    Returns the result and the paths of the renders written.
    """
    import tempfile

    from tqdm import tqdm

    cfg.validate()
    start = time.time()
    total, records = scenarios(cfg.data, cfg.max_scenarios)
    source = _RolloutSource(cfg)
    per_scenario, to_render, pending = [], [], []
    bar = tqdm(total=total, desc="evaluate", unit="scenario", disable=not progress)

    def score_pending() -> None:
        # The official evaluator runs a chunk of scenarios at a time in parallel Ray tasks.
        for (rec, _), metrics in zip(pending, _score_official(pending)):
            per_scenario.append({"scenario_id": rec.scenario_id, **metrics})
        bar.update(len(pending))
        pending.clear()

    for i, record in enumerate(records):
        states = source.states(i, record)
        if len(to_render) < cfg.num_renders:
            to_render.append((record, states))
        if cfg.official:
            pending.append((record, states))
            if len(pending) >= _OFFICIAL_CHUNK:
                score_pending()
        else:
            per_scenario.append({"scenario_id": record.scenario_id, **_score_fast(record, states)})
            bar.update(1)
        bar.set_postfix(metametric=f"{np.mean([m['metametric'] for m in per_scenario]):.4f}"
                        if per_scenario else "-")
    if pending:
        score_pending()
    bar.close()
    unused = set(source.protos) - source.used
    if unused:
        raise ValueError(f"{cfg.rollouts} holds rollouts of scenarios that are not in {cfg.data}: "
                         f"{sorted(unused)[:5]}")

    result = EvaluationResult(leaderboard=leaderboard(per_scenario), per_scenario=per_scenario,
                              evaluator="official" if cfg.official else "fast",
                              seconds=time.time() - start)
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**result.to_dict(), "config": asdict(cfg)}, indent=2))
        render_dir = out.parent / f"{out.stem}_renders"
    else:
        render_dir = Path(tempfile.mkdtemp(prefix="smart_r1_renders_"))
    renders = _render(to_render, render_dir)
    _log_to_mlflow(result, renders)
    return result, renders


def export_submission(checkpoint: str, data: str, out_dir: str | Path, info, seed: int = 0,
                      max_scenarios: int | None = None, progress: bool = True, top_k: int = 0,
                      temperature: float = 1.0) -> Path:
    """Roll out every scenario 32 times with the model and write a checked submission; the tar.gz.

    info: a `SubmissionInfo`; its num_model_parameters is filled from the model when left empty.
    """
    import dataclasses

    from tqdm import tqdm

    from smart_r1.evaluation.submission import SubmissionWriter
    from smart_r1.metrics.rollouts_io import states_to_scenario_rollouts

    info.validate()
    model = load_model(checkpoint)
    if not info.num_model_parameters:
        info = dataclasses.replace(info, num_model_parameters=str(model.num_parameters()))
    total, records = scenarios(data, max_scenarios)
    with SubmissionWriter(Path(out_dir), info) as writer:
        for i, record in enumerate(tqdm(records, total=total, desc="export", unit="scenario",
                                        disable=not progress)):
            states = model_states(model, record, NUM_SUBMISSION_ROLLOUTS, seed + i, top_k, temperature)
            writer.add(record, states_to_scenario_rollouts(record, states))
    return writer.archive
