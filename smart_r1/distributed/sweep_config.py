"""The alpha/beta sweep's configuration: its search space, read from a YAML
(pipelines/sweep_alpha_beta.yaml), and the pipeline config each trial runs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from smart_r1.config import BASELINES, PipelineConfig, StageConfig, check_types


@dataclass(frozen=True)
class SweepConfig:
    """The search space and how the sweep runs; read from a YAML (pipelines/sweep_alpha_beta.yaml)."""

    pipeline: str  # the base pipeline YAML (its stages, data, model, eval, ray sections)
    out_dir: str = "runs/sweep_alpha_beta"
    search: str = "grid"  # grid: every (alpha, beta) pair; random: num_samples uniform draws
    # grid values: numbers in [0, 1] or the baselines "auto" / "loo" (see MPOStage.alpha); random: drawn in [min, max]
    alpha: tuple[float | str, ...] = (0.77,)
    beta: tuple[float, ...] = (0.04,)
    num_samples: int = 1  # random: trials; grid: repeats of the whole grid
    rft_stage: str = "rft"  # the MPO stage whose alpha/beta are swept; it and later stages run per trial
    max_concurrent_trials: int = 0  # 0 = as many whole trials as the cluster holds (see module doc)
    asha: bool = False  # ASHA early stopping, a rung after each stage of a trial
    asha_grace_period: int = 1  # stages every trial runs before ASHA may stop it
    # the data sets trials are scored on, the first ranks them: tune splits only (settings are chosen
    # there; report splits are read only to write tables); auto = real_tune,sumo_tune with real scenes
    # (data.real), else sumo_tune
    rank_data: str = "auto"

    def validate(self) -> "SweepConfig":
        if self.search not in ("grid", "random"):
            raise ValueError(f"sweep: search must be 'grid' or 'random', got {self.search!r}")
        for name, low in (("alpha", 0.0), ("beta", 0.0)):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"sweep: {name} needs at least one value")
            words = [v for v in values if isinstance(v, str)]
            if name == "alpha" and words and (set(words) - set(BASELINES) or self.search != "grid"):
                raise ValueError(f"sweep space: alpha takes numbers or {list(BASELINES)} (grid search only), got "
                                 f"{list(values)}")
            bad = [v for v in values if not isinstance(v, str)
                   and (not math.isfinite(v) or v < low or (name == "alpha" and v > 1.0))]
            if bad:
                valid = "[0, 1] (the realism metric's range)" if name == "alpha" else ">= 0"
                raise ValueError(f"sweep space: {name} must be {valid}, got {bad} in {list(values)}")
        if self.num_samples < 1:
            raise ValueError(f"sweep: num_samples must be >= 1, got {self.num_samples}")
        if self.max_concurrent_trials < 0:
            raise ValueError("sweep: max_concurrent_trials must be >= 0 (0 = automatic)")
        if self.asha_grace_period < 1:
            raise ValueError("sweep: asha_grace_period must be >= 1")
        if self.rank_data != "auto" and any(not d.strip().endswith("_tune") for d in self.rank_data.split(",")):
            raise ValueError(f"sweep: rank_data must name tune sets (real_tune, sumo_tune): settings are chosen on "
                             f"tune data, report sets are only read to write tables; got {self.rank_data!r}")
        return self

    def trial_datasets(self, base: PipelineConfig) -> str:
        """The data sets a trial is scored on (`eval.datasets`), the ranking one first."""
        if self.rank_data != "auto":
            return self.rank_data
        return "real_tune,sumo_tune" if base.data.real_source() else "sumo_tune"

    def space(self) -> dict:
        """The Tune search space."""
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
        raw[name] = tuple(v if isinstance(v, str) and name == "alpha" and v in BASELINES else float(v)
                          for v in (value if isinstance(value, (list, tuple)) else [value]))
    config = SweepConfig(**raw)
    check_types(config, "sweep config")
    return config.validate()


def split_stages(base: PipelineConfig, rft_stage: str) -> tuple[tuple[StageConfig, ...], tuple[StageConfig, ...]]:
    """(stages run once before the sweep, stages every trial runs)."""
    names = [s.name for s in base.stages]
    if rft_stage not in names:
        raise ValueError(f"sweep: rft_stage {rft_stage!r} is not a stage of the pipeline ({names})")
    if base.stage(rft_stage).kind != "mpo":
        raise ValueError(f"sweep: stage {rft_stage!r} is a {base.stage(rft_stage).kind} stage, not mpo")
    i = names.index(rft_stage)
    return base.stages[:i], base.stages[i:]


def trial_config(base: PipelineConfig, rft_stage: str, alpha: float | str, beta: float, out_dir: str,
                 datasets: str = "auto") -> PipelineConfig:
    """The pipeline a trial runs: the RFT stage with this alpha/beta and the stages after it, scored
    on `datasets` (the sweep's tune sets)."""
    _, stages = split_stages(base, rft_stage)
    stages = tuple(dataclasses.replace(s, alpha=alpha, beta=beta) if s.name == rft_stage else s for s in stages)
    evaluation = dataclasses.replace(base.eval, datasets=datasets)
    return dataclasses.replace(base, stages=stages, out_dir=out_dir, eval=evaluation)


def check_space(sweep: SweepConfig, base: PipelineConfig, checkpoint: str = "") -> None:
    """Every check that can fail before any trial starts (ValueError with a clear message)."""
    sweep.validate()
    before, _ = split_stages(base, sweep.rft_stage)
    numbers = [a for a in sweep.alpha if not isinstance(a, str)]
    alphas = [a for a in sweep.alpha if isinstance(a, str)] + ([min(numbers), max(numbers)] if numbers else [])
    for alpha in alphas:  # grid points and random ranges alike
        for beta in (min(sweep.beta), max(sweep.beta)):
            dataclasses.replace(trial_config(base, sweep.rft_stage, alpha, beta, base.out_dir,
                                             sweep.trial_datasets(base)), init_checkpoint="").validate()
    if not checkpoint and not before:
        raise ValueError(f"sweep: no stage runs before {sweep.rft_stage!r}; give the shared SFT checkpoint "
                         "(--sft-checkpoint)")
