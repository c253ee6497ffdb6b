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

import dataclasses
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
from tqdm import tqdm

from smart_r1.config import EvaluateConfig, SamplingConfig
from smart_r1.data.dataset import count_scenarios, iter_scenarios
from smart_r1.evaluation.submission import SubmissionWriter, read_rollouts
from smart_r1.metrics import compute_scenario_metrics, step_events
from smart_r1.metrics.leaderboard import Leaderboard, leaderboard
from smart_r1.metrics.rollouts_io import scenario_rollouts_to_states, states_to_scenario_rollouts
from smart_r1.rollout.policy import load_policy, sample_states
from smart_r1.storage import write_json
from smart_r1.types import ScenarioRecord
from smart_r1.viz.render import render_scenario

NUM_SUBMISSION_ROLLOUTS = 32  # what the challenge requires per scenario
_OFFICIAL_CHUNK = 8  # scenarios per call of the Ray evaluator (the progress bar moves per chunk)


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


def scenarios(data: str | Path, limit: int | None = None) -> tuple[int, Iterator[ScenarioRecord]]:
    """(count, iterator) of the dataset's scenarios; ValueError when there is none."""
    total = count_scenarios(data)
    if limit is not None:
        total = min(total, limit)
    if total == 0:
        raise ValueError(f"{data} holds no scenario")
    return total, iter_scenarios(data, limit)


class _RolloutSource:
    """Rollout states per scenario: from a model, or from a rollouts file matched by scenario id."""

    def __init__(self, cfg: EvaluateConfig):
        self.cfg = cfg
        self.model = load_policy(cfg.checkpoint) if cfg.checkpoint else None
        self.protos = {}
        if cfg.rollouts:
            self.protos = {r.scenario_id: r for r in read_rollouts(cfg.rollouts)}
        self.used: set[str] = set()

    def states(self, index: int, record: ScenarioRecord) -> np.ndarray:
        if self.model is not None:
            return sample_states(self.model, record, self.cfg.num_rollouts, self.cfg.seed + index,
                                 self.cfg.sampling)
        proto = self.protos.get(record.scenario_id)
        if proto is None:
            raise ValueError(f"{self.cfg.rollouts} has no rollouts for scenario {record.scenario_id} of "
                             f"{self.cfg.data} (it has rollouts for {sorted(self.protos)[:5]})")
        self.used.add(record.scenario_id)
        return scenario_rollouts_to_states(record, proto)


def _score_official(pairs: list[tuple[ScenarioRecord, np.ndarray]]) -> list[dict[str, float]]:
    from smart_r1.metrics.official import official_metrics_parallel  # TensorFlow: loaded on use

    return official_metrics_parallel([(rec, states_to_scenario_rollouts(rec, st)) for rec, st in pairs])


def _render(pairs: list[tuple[ScenarioRecord, np.ndarray]], folder: Path) -> list[Path]:
    return [render_scenario(rec, st, folder / f"{safe_name(rec.scenario_id)}.png", events=step_events(rec, st[0]))
            for rec, st in pairs]


def safe_name(text: str) -> str:
    """`text` as a file name: characters other than letters, digits, '-', '_' and '.' become '_'
    (a scenario id comes from the input file and must not name a path elsewhere)."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in text).lstrip(".")
    return name[:128] or "_"


def _log_to_mlflow(result: EvaluationResult, renders: list[Path]) -> bool:
    """Log the table, the JSON and the renders to the active MLflow run; False when none is active."""
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
            per_scenario.append({"scenario_id": record.scenario_id, **compute_scenario_metrics(record, states)})
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
        write_json(out, {**result.to_dict(), "config": asdict(cfg)})
        render_dir = out.parent / f"{out.stem}_renders"
    else:
        render_dir = Path(tempfile.mkdtemp(prefix="smart_r1_renders_"))
    renders = _render(to_render, render_dir)
    _log_to_mlflow(result, renders)
    return result, renders


def export_submission(checkpoint: str, data: str, out_dir: str | Path, info, seed: int = 0,
                      max_scenarios: int | None = None, progress: bool = True,
                      sampling: SamplingConfig = SamplingConfig()) -> Path:
    """Roll out every scenario 32 times with the model and write a checked submission; the tar.gz.

    info: a `SubmissionInfo`; its num_model_parameters is filled from the model when left empty.
    """
    info.validate()
    sampling.validate()
    model = load_policy(checkpoint)
    if not info.num_model_parameters:
        info = dataclasses.replace(info, num_model_parameters=str(model.num_parameters()))
    total, records = scenarios(data, max_scenarios)
    with SubmissionWriter(Path(out_dir), info) as writer:
        for i, record in enumerate(tqdm(records, total=total, desc="export", unit="scenario",
                                        disable=not progress)):
            states = sample_states(model, record, NUM_SUBMISSION_ROLLOUTS, seed + i, sampling)
            writer.add(record, states_to_scenario_rollouts(record, states))
    return writer.archive
