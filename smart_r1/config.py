"""Frozen configs for the stage DAG BC -> closed-loop SFT (CAT-K) -> RFT (MPO) -> SFT.

A pipeline config is one YAML file (see pipelines/*.yaml) whose values can be overridden on the
command line with `--set SECTION.FIELD=VALUE` (e.g. `--set rft.alpha=0.8`). Everything is checked
by `validate()` before any cluster work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

STAGE_KINDS = ("bc", "catk_sft", "mpo")


@dataclass(frozen=True)
class DataConfig:
    train: str = ""  # Parquet folder (or TFRecord glob); "" = generate the embedded SUMO set
    heldout: str = ""  # held-out scenarios for per-stage metrics; "" = generated with the train set
    embedded_train_scenarios: int = 200  # sizes of the generated SUMO sets
    embedded_heldout_scenarios: int = 20
    seed: int = 0
    real_scenario: str = "auto"  # a WOMD TFRecord also scored after each stage; "auto" = ../shared's, "" = none


@dataclass(frozen=True)
class ModelSection:
    preset: str = "cpu"  # a ModelConfig preset (smart_r1.model.config): default (7M) | cpu | test
    vocab_size: int = 2048


@dataclass(frozen=True)
class StageConfig:
    """One stage of the DAG. Fields a kind does not use are ignored by it."""

    name: str
    kind: str  # bc | catk_sft | mpo
    epochs: int = 1  # bc / catk_sft: passes over the training scenarios
    steps_per_epoch: int = 0  # bc / catk_sft: 0 = a whole pass; else this many batches, freshly shuffled
    steps: int = 10  # mpo: RL updates
    lr: float = 5e-4
    batch_scenarios: int = 4  # scenarios per gradient step
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # closed-loop SFT (CAT-K)
    top_k: int = 5  # K most likely tokens among which the one closest to the log is kept
    # MPO
    alpha: float = 0.77  # fixed baseline, advantage = reward - alpha; near the SFT policy's mean reward
    beta: float = 0.04  # KL(pi || pi_ref) weight
    num_rollouts: int = 8  # rollouts per scenario per RL step (paper: 32)
    scenarios_per_step: int = 4
    updates_per_batch: int = 1  # >1 reuses a batch (then ratio clipping applies)
    clip_eps: float = 0.2
    kl_estimator: str = "k3"
    per_agent_credit: bool = False  # each agent's own collision/off-road flags in its reward
    # reward = weighted mean of realism and the collision-free / on-road fractions of agents
    # (smart_r1.rl.rewards); 0 and 0 = the realism score alone
    collision_weight: float = 1.0
    offroad_weight: float = 1.0
    max_staleness: int = 1  # drop rollouts made with weights older than this many updates
    temperature: float = 1.0
    top_k_sampling: int = 0  # 0 = sample from the whole vocabulary

    def validate(self) -> None:
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"stage {self.name!r}: unknown kind {self.kind!r} (one of {STAGE_KINDS})")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"stage {self.name!r}: alpha must lie in [0, 1] (the metric's range), got {self.alpha}")
        if self.beta < 0:
            raise ValueError(f"stage {self.name!r}: beta must be >= 0, got {self.beta}")
        if self.top_k < 1:
            raise ValueError(f"stage {self.name!r}: top_k (CAT-K's K) must be >= 1, got {self.top_k}")
        positive = ("epochs", "steps", "batch_scenarios", "num_rollouts", "scenarios_per_step",
                    "updates_per_batch")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"stage {self.name!r}: {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"stage {self.name!r}: lr must be > 0, got {self.lr}")
        if self.kl_estimator not in ("k3", "full"):
            raise ValueError(f"stage {self.name!r}: kl_estimator must be 'k3' or 'full'")
        if self.max_staleness < 0:
            raise ValueError(f"stage {self.name!r}: max_staleness must be >= 0")
        if self.collision_weight < 0 or self.offroad_weight < 0:
            raise ValueError(f"stage {self.name!r}: collision_weight and offroad_weight must be >= 0")
        if self.steps_per_epoch < 0:
            raise ValueError(f"stage {self.name!r}: steps_per_epoch must be >= 0 (0 = a whole pass)")


@dataclass(frozen=True)
class RayConfig:
    num_rollout_workers: int = 1
    cpus_per_rollout_worker: float = 1.0
    gpus_per_rollout_worker: float = 0.0
    num_learners: int = 1  # Ray Train workers (DDP)
    use_gpu: bool = False
    cpus_per_learner: float = 1.0
    # torch threads per learner worker; 0 = its CPUs. More pays off on a small machine: the
    # rollout workers sit idle during BC and SFT, and their cores would go unused.
    learner_threads: int = 0
    max_learner_failures: int = 2
    storage_path: str = ""  # Ray Train / Tune storage; "" = <out_dir>/ray


@dataclass(frozen=True)
class EvalConfig:
    num_rollouts: int = 8  # per held-out scenario (WOSAC: 32)
    max_scenarios: int = 20
    # how the evaluated policy samples its tokens (part of the policy, as in a WOSAC submission);
    # RFT stages sample with their own temperature / top_k_sampling, best set alike
    top_k: int = 0  # 0 = the whole vocabulary
    temperature: float = 1.0


@dataclass(frozen=True)
class PipelineConfig:
    out_dir: str = "runs/sft_rft_sft"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    ray: RayConfig = field(default_factory=RayConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init_checkpoint: str = ""  # start from this checkpoint instead of running the bc stage
    stages: tuple[StageConfig, ...] = ()

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise ValueError(f"unknown stage name {name!r}; stages are {[s.name for s in self.stages]}")

    def validate(self) -> "PipelineConfig":
        if not self.stages:
            raise ValueError("the pipeline has no stages")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        for s in self.stages:
            s.validate()
        for path, what in ((self.data.train, "data.train"), (self.data.heldout, "data.heldout"),
                           (self.init_checkpoint, "init_checkpoint")):
            if path and "*" not in path and not Path(path).exists():
                raise ValueError(f"{what}: no such path {path!r}")
        if self.ray.num_rollout_workers < 1 or self.ray.num_learners < 1:
            raise ValueError("ray.num_rollout_workers and ray.num_learners must be >= 1")
        if self.ray.learner_threads < 0:
            raise ValueError(f"ray.learner_threads must be >= 0 (0 = the learner's CPUs), got {self.ray.learner_threads}")
        if self.eval.num_rollouts < 1:
            raise ValueError("eval.num_rollouts must be >= 1")
        if self.eval.top_k < 0 or self.eval.temperature <= 0:
            raise ValueError("eval.top_k must be >= 0 and eval.temperature > 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: str, like: Any) -> Any:
    """Parse a command-line string to the type of the field's current value (an int field also
    takes a float: YAML writes `1` for a CPU count that `--set` may make 0.5)."""
    if isinstance(like, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if isinstance(like, int):
        number = float(value)
        return int(number) if number.is_integer() and "." not in value else number
    if isinstance(like, float):
        return float(value)
    return value


def _build(cls, values: dict[str, Any], where: str):
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    return cls(**values)


def from_dict(raw: dict[str, Any]) -> PipelineConfig:
    raw = dict(raw or {})
    sections = {"data": DataConfig, "model": ModelSection, "ray": RayConfig, "eval": EvalConfig}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in sections:
            kwargs[key] = _build(sections[key], value or {}, key)
        elif key == "stages":
            kwargs[key] = tuple(_build(StageConfig, s, f"stages[{i}]") for i, s in enumerate(value))
        else:
            kwargs[key] = value
    return _build(PipelineConfig, kwargs, "pipeline config")


def apply_overrides(config: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """Apply `SECTION.FIELD=VALUE` overrides; SECTION is data/model/ray/eval, a stage name, or
    empty for a top-level field (`out_dir=...`)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form SECTION.FIELD=VALUE")
        key, value = item.split("=", 1)
        section, _, name = key.rpartition(".")
        if not section:
            if name not in {f.name for f in fields(config)} or name == "stages":
                raise ValueError(f"override {item!r}: the pipeline config has no field {name!r}")
            config = dataclasses.replace(config, **{name: _coerce(value, getattr(config, name))})
        elif section in ("data", "model", "ray", "eval"):
            part = getattr(config, section)
            if name not in {f.name for f in fields(part)}:
                raise ValueError(f"override {item!r}: {section} has no field {name!r}")
            part = dataclasses.replace(part, **{name: _coerce(value, getattr(part, name))})
            config = dataclasses.replace(config, **{section: part})
        else:
            stage = config.stage(section)  # raises for an unknown stage name
            if name not in {f.name for f in fields(stage)}:
                raise ValueError(f"override {item!r}: a stage has no field {name!r}")
            new = dataclasses.replace(stage, **{name: _coerce(value, getattr(stage, name))})
            config = dataclasses.replace(
                config, stages=tuple(new if s.name == section else s for s in config.stages))
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no such config file: {path}")
    config = from_dict(yaml.safe_load(path.read_text()))
    return apply_overrides(config, overrides or []).validate()
