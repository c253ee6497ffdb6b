"""Frozen configs for the stage DAG BC -> closed-loop SFT (CAT-K) -> RFT (MPO) -> SFT.

A pipeline config is one YAML file (see pipelines/*.yaml) whose values can be overridden on the
command line with `--set SECTION.FIELD=VALUE` (e.g. `--set rft.alpha=0.8`,
`--set rft.sampling.top_k=8`). Each kind of stage has its own config (`BCStage`, `CatKStage`,
`MPOStage`); the MPO stage and the evaluation share `SamplingConfig`, the policy's sampling.
Every field carries its help text (`metadata["help"]`), from which the command-line flags of
`smart-r1` are made (`add_config_flags`). Types and values are checked by `validate()` before
any cluster work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from smart_r1.model.config import ModelConfig


def option(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with its help text (shown by `--help` and in the docs)."""
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass(frozen=True)
class SamplingConfig:
    """How the policy samples its motion tokens: part of the policy that WOSAC scores."""

    top_k: int = option(0, "sample among the k most likely tokens (0: the whole vocabulary)")
    top_p: float = option(1.0, "nucleus sampling: the smallest set of tokens with this probability mass")
    temperature: float = option(1.0, "sampling temperature (> 0)")

    def validate(self, where: str = "sampling") -> None:
        if self.top_k < 0:
            raise ValueError(f"{where}.top_k must be >= 0 (0 = all tokens), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"{where}.top_p must lie in (0, 1], got {self.top_p}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"{where}.temperature must be > 0, got {self.temperature}")


# Data sets by name (smart_r1.distributed.pipeline.prepare_data): "train" (data.train, or generated
# SUMO), "heldout" (data.heldout), generated SUMO sets "sumo_heldout" and "sumo_tune" (one scenario per
# network, networks no training scene comes from), and the real WOMD scenes of data.real split by a
# hash of the scene id (smart_r1.data.splits): "real_train", "real_tune", "real_report".
DATASET_NAMES = ("train", "heldout", "sumo_heldout", "sumo_tune", "real_train", "real_tune", "real_report")
SHARED_REAL = Path(__file__).resolve().parents[1].parent / "shared" / "womd" / "real"


@dataclass(frozen=True)
class DataConfig:
    train: str = option("", "Parquet folder (or TFRecord glob) of training scenarios; '' = generate the embedded SUMO set")
    heldout: str = option("", "held-out scenarios of your own (named 'heldout' in tables); '' = none (with "
                              "generated training data, the generated 'sumo_heldout' set scores the stages)")
    embedded_train_scenarios: int = option(200, "size of the generated SUMO training set")
    embedded_heldout_scenarios: int = option(20, "size of each generated SUMO evaluation set (sumo_heldout, "
                                                 "sumo_tune): one scenario per network")
    seed: int | None = option(None, "seed of the generated SUMO training set; None = the run's seed (each seed "
                                    "of a multi-seed study draws its own training data)")
    heldout_seed: int = option(100_000, "seed of the generated sumo_heldout set (sumo_tune: + 100000): fixed, so "
                                        "runs of every seed are scored on the same scenarios")
    real: str = option("auto", "folder (or URI) of real WOMD Scenario TFRecords, split by a hash of the scene id "
                               "into real_train / real_tune / real_report; 'auto' = ../shared/womd/real when "
                               "present, '' = none")
    generated_root: str = option("", "folder or URI under which generated SUMO sets and the real splits live "
                                      "(data/<name>); '' = out_dir (a sweep points its trials at its shared folder)")
    tokens_root: str = option("", "folder or URI under which the token shards live (tokens/<vocab hash>/...); "
                                  "'' = out_dir (a sweep points its trials at its shared folder)")

    def real_source(self) -> str:
        """data.real resolved: a folder or URI, or '' (auto without ../shared)."""
        if self.real == "auto":
            return str(SHARED_REAL) if SHARED_REAL.is_dir() else ""
        return self.real


# What the forward passes compute in (smart_r1.model.precision): auto = bfloat16 where the
# device has it natively (CUDA with bf16, a CPU with AVX512-BF16 / AMX), float32 elsewhere.
PRECISIONS = ("auto", "float32", "bfloat16")
# ModelSection's overrides of its preset's sizes (0: the preset's)
MODEL_SIZES = ("dim", "agent_blocks")


@dataclass(frozen=True)
class ModelSection:
    preset: str = option("cpu", "a ModelConfig preset (smart_r1.model.config): default (SMART-tiny) | cpu | test")
    vocab_size: int = option(2048, "motion tokens per agent type")
    vocab_scenarios: int = option(200, "training scenarios whose logged motions the vocabulary is built from")
    vocab_samples: int = option(10000, "motion samples per agent type clustered into tokens (memory: "
                                       "2 bytes x samples^2 on the driver, 200 MB at 10000)")
    precision: str = option("auto", "forward passes in auto | float32 | bfloat16; auto = bfloat16 where the "
                                    "device computes it natively (CUDA, CPUs with AVX512-BF16 / AMX), else float32")
    dim: int = option(0, "hidden width of every token; 0 = the preset's (a multiple of its attention heads)")
    agent_blocks: int = option(0, "decoder blocks (temporal, map-to-agent, agent-to-agent attention); 0 = the preset's")

    def validate(self) -> None:
        for name in ("vocab_size", "vocab_scenarios", "vocab_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"model.precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in MODEL_SIZES:
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0 (0: the preset's), got {getattr(self, name)}")
        heads = self.model_config().num_heads
        if self.dim % heads:
            raise ValueError(f"model.dim must be a multiple of the {self.preset} preset's {heads} attention heads, "
                             f"got {self.dim}")

    def model_config(self) -> ModelConfig:
        """The SMART-tiny config this section names: the preset at this vocabulary size, with the
        width and depth overrides that are set."""
        return ModelConfig.preset(self.preset, vocab_size=self.vocab_size, **self._sizes())

    def describe(self) -> str:
        """The preset and its overrides, e.g. `cpu, dim 96`."""
        return ", ".join([self.preset] + [f"{name.replace('_', ' ')} {v}" for name, v in self._sizes().items()])

    def _sizes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MODEL_SIZES if getattr(self, name)}


def parse_train_data(text: str, where: str) -> list[tuple[str, int]]:
    """A stage's `train_data`, "train+real_train*4", as [(data set name, repeats)]; ValueError names
    the bad part."""
    parts = []
    for item in text.split("+"):
        name, _, times = item.strip().partition("*")
        if name not in DATASET_NAMES:
            raise ValueError(f"{where}: train_data names unknown data set {name!r}; known: {list(DATASET_NAMES)}")
        if times and not (times.isdigit() and int(times) >= 1):
            raise ValueError(f"{where}: train_data repeats {item!r} must be a whole number >= 1, as in real_train*4")
        parts.append((name, int(times or 1)))
    if len({n for n, _ in parts}) != len(parts):
        raise ValueError(f"{where}: train_data names a data set twice: {text!r}")
    return parts


@dataclass(frozen=True)
class _Stage:
    """What every stage has. `kind` is fixed by the class (BCStage, CatKStage, MPOStage)."""

    name: str = option("", "the stage's name (its folder under out_dir, its --set section)")
    train_data: str = option("train", "the data sets it learns from, '+'-joined, each repeated '*k' times per "
                                      "pass: e.g. train+real_train*4 (names: see DATASET_NAMES; a real_* set "
                                      "is left out, said once, when data.real is auto and absent)")
    lr: float = option(5e-4, "learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(1.0, "gradients are clipped to this global norm")
    max_nonfinite_updates: int = option(3, "updates in a row skipped for a non-finite loss or gradient "
                                           "before the stage stops with an error")

    def validate(self) -> None:
        where = f"stage {self.name!r}"
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{where}: a stage name is letters, digits, '_' or '-' (it names a folder)")
        if not self.lr > 0:
            raise ValueError(f"{where}: lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"{where}: weight_decay must be >= 0, got {self.weight_decay}")
        if not self.grad_clip > 0:
            raise ValueError(f"{where}: grad_clip must be > 0, got {self.grad_clip}")
        if self.max_nonfinite_updates < 0:
            raise ValueError(f"{where}: max_nonfinite_updates must be >= 0, got {self.max_nonfinite_updates}")
        parse_train_data(self.train_data, where)


@dataclass(frozen=True)
class _SupervisedStage(_Stage):
    epochs: int = option(1, "passes over the training scenarios")
    steps_per_epoch: int = option(0, "0 = a whole pass; else this many batches per epoch, freshly shuffled")
    batch_scenarios: int = option(4, "scenarios per gradient step and learner: the global batch is "
                                     "ray.num_learners x batch_scenarios (lr is not rescaled with it)")
    label_smoothing: float = option(0.0, "share of each target token's probability spread over the "
                                         "vocabulary in the cross-entropy (SMART: 0.1)")
    memory_budget_gb: float = option(0.0, "a learner's memory for one step (GiB, on its device): a batch whose "
                                          "estimate (smart_r1/distributed/memory_estimate.py) is above it is split "
                                          "into micro-batches whose gradients add up to the batch's (the same "
                                          "step); 0 = the whole batch at once")

    def validate(self) -> None:
        super().validate()
        if self.memory_budget_gb < 0:
            raise ValueError(f"stage {self.name!r}: memory_budget_gb must be >= 0 (0 = no budget)")
        for name in ("epochs", "batch_scenarios"):
            if getattr(self, name) < 1:
                raise ValueError(f"stage {self.name!r}: {name} must be >= 1, got {getattr(self, name)}")
        if self.steps_per_epoch < 0:
            raise ValueError(f"stage {self.name!r}: steps_per_epoch must be >= 0 (0 = a whole pass)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"stage {self.name!r}: label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass(frozen=True)
class BCStage(_SupervisedStage):
    """Behaviour cloning: teacher-forced next-token prediction (warm-up, cosine decay of lr)."""

    token_noise_top_k: int = option(1, "SMART's token noise: each training token after the first is drawn among "
                                       "this many closest to the log, re-drawn every batch (1 = none)")
    kind: str = field(default="bc", init=False, metadata={"help": "bc"})

    def validate(self) -> None:
        super().validate()
        if self.token_noise_top_k < 1:
            raise ValueError(f"stage {self.name!r}: token_noise_top_k must be >= 1 (1 = no noise), "
                             f"got {self.token_noise_top_k}")


@dataclass(frozen=True)
class CatKStage(_SupervisedStage):
    """Closed-loop SFT on CAT-K rollouts (constant lr)."""

    catk_k: int = option(5, "CAT-K's K: the executed token is the one closest to the log among the K most likely")
    bc_weight: float = option(0.0, "weight of the log's own next-token loss added to the CAT-K loss "
                                   "(0 = CAT-K alone, as published)")
    anchor_weight: float = option(0.0, "weight of KL(pi_start || pi) on the CAT-K states, pi_start the "
                                       "stage's starting checkpoint (keeps what RFT learnt in a final SFT)")
    kind: str = field(default="catk_sft", init=False, metadata={"help": "catk_sft"})

    def validate(self) -> None:
        super().validate()
        if self.catk_k < 1:
            raise ValueError(f"stage {self.name!r}: catk_k (CAT-K's K) must be >= 1, got {self.catk_k}")
        for name in ("bc_weight", "anchor_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"stage {self.name!r}: {name} must be >= 0, got {getattr(self, name)}")


BASELINES = ("auto", "loo")  # MPOStage.alpha's words: calibrated fixed baseline, leave-one-out group baseline


@dataclass(frozen=True)
class MPOStage(_Stage):
    """RFT with Metric-oriented Policy Optimization (smart_r1.rl.mpo)."""

    steps: int = option(10, "RL updates")
    alpha: float | str = option(0.77, "the baseline: a fixed number, advantage = reward - alpha, on the reward's "
                                      "[0, 1] scale; 'auto' = fixed at the starting policy's mean reward on the "
                                      "first RL step's batch; 'loo' = each rollout's reward against the mean of the "
                                      "other rollouts of its scenario (leave-one-out, as RLFTSim)")
    beta: float = option(0.04, "weight of KL(pi || pi_ref)")
    num_rollouts: int = option(8, "rollouts per scenario per RL step (paper: 32)")
    scenarios_per_step: int = option(4, "scenarios per RL step")
    updates_per_batch: int = option(1, "updates on one batch; > 1 reuses it (then ratio clipping applies)")
    rollouts_per_backward: int = option(0, "rollouts of a scene in one backward pass of the update: the "
                                           "learner's activation memory is one such chunk's, gradients add "
                                           "up over chunks and scenes (the same step); 0 = a whole scene")
    clip_eps: float = option(0.2, "ratio clipping of the surrogate when a batch is reused or stale")
    kl_estimator: str = option("k3", "k3 (sampled tokens) or full (whole vocabulary)")
    per_agent_credit: bool = option(True, "each agent's own collision / off-road flags in its reward "
                                          "(false: the rollout's fractions, shared by all its agents)")
    collision_weight: float = option(1.0, "weight of the collision-free fraction in the reward (0 = realism only)")
    offroad_weight: float = option(1.0, "weight of the on-road fraction in the reward (0 = realism only)")
    progress_weight: float = option(0.0, "weight of each agent's progress, min(1, simulated / logged path length), "
                                         "in the reward: keeps RFT from buying safety by slowing agents down")
    gate_by_progress: bool = option(False, "the collision- and off-road-free terms earned in proportion to each "
                                           "agent's progress: no safety credit for standing still")
    progress_both_ways: bool = option(False, "progress also charges travelling further than the log: "
                                             "min(s / l, l / s) of the simulated and logged path lengths (each "
                                             "floored at 1 m) instead of min(1, s / l)")
    max_staleness: int = option(1, "drop rollouts made with weights older than this many updates")
    min_rollout_fraction: float = option(0.5, "least fraction of a step's scenarios with usable rollouts; "
                                              "below it the step is sampled again once, then the stage stops")
    checkpoint_every: int = option(10, "RL steps between checkpoints (rank 0 writes <stage>/last_state.pt and the "
                                       "logs); the last step is always saved; a resumed stage redoes at most this "
                                       "many steps. 10: SMART-tiny's state (66 MB with AdamW) took 0.7 s to upload "
                                       "to S3, 7% of the shortest RL step measured (10 s) if saved every step, 0.7% "
                                       "every 10 (BENCHMARKS.md, 'RL checkpoint cadence'). Not part of the stage's "
                                       "fingerprint")
    sampling: SamplingConfig = option(SamplingConfig(), "how the rollouts sample tokens (the policy pi)")
    kind: str = field(default="mpo", init=False, metadata={"help": "mpo"})

    def validate(self) -> None:
        super().validate()
        where = f"stage {self.name!r}"
        if self.alpha not in BASELINES and not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"{where}: alpha must lie in [0, 1] (the metric's range) or be one of {list(BASELINES)}, "
                             f"got {self.alpha!r}")
        if self.alpha == "loo" and self.num_rollouts < 2:
            raise ValueError(f"{where}: alpha 'loo' compares each rollout with the others of its scenario: "
                             f"num_rollouts must be >= 2, got {self.num_rollouts}")
        if self.beta < 0:
            raise ValueError(f"{where}: beta must be >= 0, got {self.beta}")
        for name in ("steps", "num_rollouts", "scenarios_per_step", "updates_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}: {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.clip_eps < 1.0:
            raise ValueError(f"{where}: clip_eps must lie in (0, 1), got {self.clip_eps}")
        if self.kl_estimator not in ("k3", "full"):
            raise ValueError(f"{where}: kl_estimator must be 'k3' or 'full'")
        if self.max_staleness < 0:
            raise ValueError(f"{where}: max_staleness must be >= 0")
        if self.rollouts_per_backward < 0:
            raise ValueError(f"{where}: rollouts_per_backward must be >= 0 (0 = a whole scene per backward)")
        if not 0.0 < self.min_rollout_fraction <= 1.0:
            raise ValueError(f"{where}: min_rollout_fraction must lie in (0, 1], got {self.min_rollout_fraction}")
        if self.checkpoint_every < 1:
            raise ValueError(f"{where}: checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.collision_weight < 0 or self.offroad_weight < 0 or self.progress_weight < 0:
            raise ValueError(f"{where}: collision_weight, offroad_weight and progress_weight must be >= 0")
        self.sampling.validate(f"stage {self.name!r}: sampling")

    def saves_after(self, step: int) -> bool:
        """Whether RL step `step` (0-based) ends with a checkpoint: every `checkpoint_every`-th, and the last."""
        return (step + 1) % self.checkpoint_every == 0 or step + 1 == self.steps

    def check_learners(self, num_learners: int) -> None:
        """Every learner rank samples its own share of a step's scenarios: none may get nothing."""
        if self.scenarios_per_step < num_learners:
            raise ValueError(f"stage {self.name!r}: scenarios_per_step ({self.scenarios_per_step}) is below "
                             f"ray.num_learners ({num_learners}): each learner rank samples its own share of an "
                             "RL step's scenarios, so a rank would get none; raise scenarios_per_step or lower "
                             "num_learners")


StageConfig = typing.Union[BCStage, CatKStage, MPOStage]
STAGE_CLASSES: dict[str, type] = {"bc": BCStage, "catk_sft": CatKStage, "mpo": MPOStage}
STAGE_KINDS = tuple(STAGE_CLASSES)
# Keys of the one flat stage config this replaced, with where they went.
_RENAMED = {"top_k": "catk_k (CAT-K's K) or sampling.top_k (MPO's sampling)",
            "top_k_sampling": "sampling.top_k", "temperature": "sampling.temperature",
            "real_scenario": "data.real (a folder of real WOMD TFRecords, split into real_train / real_tune / "
                             "real_report)",
            "keep_checkpoints": "gone: one training state, <stage>/last_state.pt, is kept (an MPO stage's "
                                "checkpoint_every sets how often)"}


@dataclass(frozen=True)
class RayConfig:
    num_rollout_workers: int = option(1, "rollout actors")
    cpus_per_rollout_worker: float = option(1.0, "CPUs per rollout actor (fractions share a core)")
    gpus_per_rollout_worker: float = option(0.0, "GPUs per rollout actor (fractions share a GPU)")
    num_learners: int = option(1, "Ray Train workers (data-parallel)")
    use_gpu: bool = option(False, "learners on GPUs (gpus_per_learner each)")
    gpus_per_learner: float = option(1.0, "GPU share of a learner with use_gpu; below 1, rollout actors with "
                                          "gpus_per_rollout_worker > 0 share the learners' GPUs (each learner's GPU "
                                          "holds it and up to its share of the actors; README, 'Rollouts on the "
                                          "learners' GPUs'). Above 0.5 with several learners: two ranks never share one")
    cpus_per_learner: float = option(1.0, "CPUs per learner")
    # More threads than CPUs pay off on a small machine: the rollout workers sit idle during BC
    # and SFT, and their cores would go unused.
    learner_threads: int = option(0, "torch threads per learner; 0 = its CPUs")
    max_learner_failures: int = option(2, "learner restarts from the last checkpoint before the stage fails")
    max_actor_restarts: int = option(3, "restarts of a crashed rollout actor (its unfinished tasks are retried) "
                                        "before its work counts as failed")
    scenarios_per_rollout_batch: int = option(1, "scenarios a rollout actor simulates in one closed-loop batch "
                                                 "(B x num_rollouts rows, at most this many per actor call: the "
                                                 "bound on its memory); on one CPU thread 1 was fastest "
                                                 "(BENCHMARKS.md), larger batches are meant for GPU actors")
    task_timeout_s: float = option(1800.0, "longest wait for one rollout or scoring task before the run stops "
                                           "with an error naming the actor and its scenarios")
    storage_path: str = option("", "Ray Train / Tune storage (their run records); '' = <out_dir>/ray")
    verbose: bool = option(False, "Ray's own log lines (Ray Train's worker groups, checkpoints and reports; "
                                  "core warnings) on the console too; they always go to Ray's log files")

    def validate(self) -> None:
        if self.num_rollout_workers < 1 or self.num_learners < 1:
            raise ValueError("ray.num_rollout_workers and ray.num_learners must be >= 1")
        if not self.cpus_per_rollout_worker > 0 or not self.cpus_per_learner > 0:
            raise ValueError("ray.cpus_per_rollout_worker and ray.cpus_per_learner must be > 0")
        if self.gpus_per_rollout_worker < 0:
            raise ValueError("ray.gpus_per_rollout_worker must be >= 0")
        if self.use_gpu:
            self._check_gpu_sharing()
        if self.learner_threads < 0:
            raise ValueError(f"ray.learner_threads must be >= 0 (0 = the learner's CPUs), got {self.learner_threads}")
        if self.max_learner_failures < 0 or self.max_actor_restarts < 0:
            raise ValueError("ray.max_learner_failures and ray.max_actor_restarts must be >= 0")
        if self.scenarios_per_rollout_batch < 1:
            raise ValueError(f"ray.scenarios_per_rollout_batch must be >= 1, got {self.scenarios_per_rollout_batch}")
        if not self.task_timeout_s > 0:
            raise ValueError(f"ray.task_timeout_s must be > 0, got {self.task_timeout_s}")

    def _check_gpu_sharing(self) -> None:
        """Learners on fractions of GPUs: no two learners on one GPU (NCCL refuses two ranks on a
        device; Ray fills a GPU's fractions first, so two shares of 0.5 would land on the same one),
        and GPU rollout actors fit in what the learners leave of their GPUs."""
        g, a = self.gpus_per_learner, self.gpus_per_rollout_worker
        if not 0 < g <= 1:
            raise ValueError(f"ray.gpus_per_learner must lie in (0, 1], got {g}")
        if g >= 1:
            return
        if self.num_learners > 1 and g <= 0.5:
            raise ValueError(f"ray.gpus_per_learner {g} with {self.num_learners} learners: Ray could put two "
                             "learners on one GPU, which NCCL refuses; give each more than 0.5")
        if a > 0:
            beside = math.floor((1 - g) / a + 1e-9)  # actors that fit beside one learner on its GPU
            if self.num_rollout_workers > self.num_learners * beside:
                raise ValueError(
                    f"ray: {self.num_rollout_workers} rollout actors of {a:g} GPU do not fit beside "
                    f"{self.num_learners} learners of {g:g} GPU ({beside} per learner's GPU); lower "
                    "gpus_per_rollout_worker or num_rollout_workers, or give the actors GPUs of their own "
                    "(gpus_per_learner: 1)")


@dataclass(frozen=True)
class EvalConfig:
    datasets: str = option("auto", "comma-separated data sets scoring each stage; auto = real_report (when "
                                   "data.real has scenes) and heldout (or, with generated training data, "
                                   "sumo_heldout). Choose settings on real_tune,sumo_tune; report on the rest")
    num_rollouts: int = option(8, "rollouts per held-out scenario (WOSAC: 32)")
    max_scenarios: int = option(20, "scenarios of each evaluation data set scored after each stage (the first ones)")
    sampling: SamplingConfig = option(SamplingConfig(), "how the evaluated policy samples (RFT samples alike, best)")

    def validate(self) -> None:
        if self.num_rollouts < 1:
            raise ValueError("eval.num_rollouts must be >= 1")
        if self.max_scenarios < 1:
            raise ValueError("eval.max_scenarios must be >= 1")
        for name in self.names():
            if name not in DATASET_NAMES or name == "train":
                raise ValueError(f"eval.datasets: {name!r} is not an evaluation data set; known: "
                                 f"{[d for d in DATASET_NAMES if d != 'train']} or auto")
        self.sampling.validate("eval.sampling")

    def names(self) -> list[str]:
        """The named data sets ([] for auto)."""
        return [] if self.datasets == "auto" else [d.strip() for d in self.datasets.split(",") if d.strip()]


@dataclass(frozen=True)
class PipelineConfig:
    out_dir: str = option("runs/sft_rft_sft", "where the run's stages, tables and data go")
    seed: int = option(0, "seed of the model's initialisation, data order and sampling")
    data: DataConfig = option(DataConfig(), "data")
    model: ModelSection = option(ModelSection(), "model")
    ray: RayConfig = option(RayConfig(), "Ray resources")
    eval: EvalConfig = option(EvalConfig(), "held-out evaluation after each stage")
    init_checkpoint: str = option("", "start from this checkpoint instead of running the bc stage")
    stages: tuple[StageConfig, ...] = option((), "the stage DAG, in order")

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise ValueError(f"unknown stage name {name!r}; stages are {[s.name for s in self.stages]}")

    def validate(self) -> "PipelineConfig":
        check_types(self, "pipeline config")
        if not self.stages:
            raise ValueError("the pipeline has no stages")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        for s in self.stages:
            s.validate()
            if s.kind == "mpo":
                s.check_learners(self.ray.num_learners)
        for path, what in ((self.data.train, "data.train"), (self.data.heldout, "data.heldout"),
                           (self.init_checkpoint, "init_checkpoint"),
                           ("" if self.data.real == "auto" else self.data.real, "data.real")):
            if path and "*" not in path and "://" not in path and not Path(path).exists():
                raise ValueError(f"{what}: no such path {path!r}")
        for path, what in ((self.data.train, "data.train"), (self.data.heldout, "data.heldout")):
            folder = Path(path)
            if path and "://" not in path and folder.is_dir() and not any(
                    f.suffix == ".parquet" or ".tfrecord" in f.name for f in folder.iterdir()):
                raise ValueError(f"{what}: {path!r} holds no .parquet shards or TFRecord files "
                                 "(run `smart-r1 preprocess` into it first)")
        for name in ("embedded_train_scenarios", "embedded_heldout_scenarios"):
            if getattr(self.data, name) < 1:
                raise ValueError(f"data.{name} must be >= 1")
        if self.data.train and not self.data.heldout and self.eval.datasets == "auto":
            raise ValueError("data.train is your data but data.heldout is empty: the stages would be scored on "
                             "generated SUMO scenes. Set data.heldout (e.g. your WOMD validation shards), or name "
                             "the sets to score explicitly (eval.datasets=sumo_heldout)")
        if "heldout" in self.eval.names() and not self.data.heldout:
            raise ValueError("eval.datasets names heldout, but data.heldout is empty (generated SUMO held-out "
                             "scenes are sumo_heldout)")
        for s in self.stages:
            if "heldout" in dict(parse_train_data(s.train_data, s.name)) and not self.data.heldout:
                raise ValueError(f"stage {s.name!r}: train_data names heldout, but data.heldout is empty")
        self.model.validate()
        self.ray.validate()
        self.eval.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- standalone commands (smart-r1 train bc, smart-r1 evaluate) ------------------------------

@dataclass(frozen=True)
class BCConfig:
    """Standalone BC training (`smart-r1 train bc` makes its flags from these fields)."""

    epochs: int = option(8, "passes over the data")
    batch_size: int = option(8, "scenes per step")
    lr: float = option(5e-4, "peak learning rate (AdamW, warm-up then cosine decay)")
    weight_decay: float = option(0.01, "AdamW weight decay")
    grad_clip: float = option(1.0, "gradients are clipped to this global norm")
    max_agents: int = option(64, "agents kept per scene (sim agents first, then the nearest)")
    max_map_segments: int = option(1024, "map segments kept per scene")
    max_scenarios: int | None = option(None, "use at most this many scenarios")
    time_limit_s: float | None = option(None, "stop (and save) after this many seconds of training")
    seed: int = option(0, "random seed")
    threads: int | None = option(None, "torch CPU threads")


@dataclass(frozen=True)
class EvaluateConfig:
    """What `evaluate` does (`smart-r1 evaluate` makes its flags from these fields). Exactly one of
    `checkpoint` and `rollouts` is set."""

    data: str = option("", "Parquet folder or TFRecord file / glob")
    checkpoint: str | None = option(None, "SMART-tiny checkpoint to roll out")
    rollouts: str | None = option(None, "score these rollouts instead (binproto or submission tar.gz)")
    num_rollouts: int = option(32, "joint rollouts per scenario (checkpoint mode)")
    official: bool = option(False, "Waymo's evaluator (slow, Ray) instead of the fast re-implementation")
    out: str | None = option(None, "results JSON (renders go to <stem>_renders/ beside it)")
    num_renders: int = option(2, "scenarios drawn (rollout 0) and attached to the active MLflow run")
    max_scenarios: int | None = option(None, "evaluate only the first N scenarios")
    seed: int = option(0, "sampling seed")
    sampling: SamplingConfig = option(SamplingConfig(), "how the model samples its tokens")

    def validate(self) -> "EvaluateConfig":
        if (self.checkpoint is None) == (self.rollouts is None):
            raise ValueError("give either a checkpoint to roll out or a rollouts file to score")
        if self.num_rollouts < 1:
            raise ValueError(f"num_rollouts must be at least 1, got {self.num_rollouts}")
        self.sampling.validate()
        return self


# -- types -----------------------------------------------------------------------------------

def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(kind: Any) -> Any:
    """int for `int | None` (an optional field), else the type itself."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if len(args) == 1 and type(None) in typing.get_args(kind) else kind


def _type_ok(value: Any, kind: Any) -> bool:
    if value is None and _base_type(kind) is not kind:
        return True
    kind = _base_type(kind)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    return True  # nested configs and the stage tuple are checked by their own walk


def check_types(config, where: str) -> None:
    """Raise ValueError naming the first field whose value has the wrong type (YAML `lr: fast`)."""
    types = _field_types(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_types(value, f"{where}.{f.name}" if where != "pipeline config" else f.name)
        elif isinstance(value, tuple) and f.name == "stages":
            for s in value:
                check_types(s, f"stage {s.name!r}")
        elif not _type_ok(value, types[f.name]):
            name = types[f.name].__name__ if isinstance(types[f.name], type) else str(types[f.name])
            raise ValueError(f"{where}: {f.name} must be a {name}, got {value!r}")


# -- building from YAML and overrides ---------------------------------------------------------

def _build(cls, values: Any, where: str):
    """cls(**values) with nested config sections built too; unknown keys are named."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of fields, got {values!r}")
    known = {f.name for f in fields(cls) if f.init}
    unknown = set(values) - known
    if unknown:
        hints = [f"{k} is now {_RENAMED[k]}" for k in sorted(unknown) if k in _RENAMED]
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}"
                         + (f" ({'; '.join(hints)})" if hints else ""))
    types = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        kind = types[key]
        kwargs[key] = _build(kind, value or {}, f"{where}.{key}") if dataclasses.is_dataclass(kind) else value
    return cls(**kwargs)


def build_stage(raw: Any, where: str) -> StageConfig:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a stage is a mapping with a name and a kind, got {raw!r}")
    kind = raw.get("kind")
    if kind not in STAGE_CLASSES:
        raise ValueError(f"{where}: unknown kind {kind!r} (one of {STAGE_KINDS})")
    return _build(STAGE_CLASSES[kind], {k: v for k, v in raw.items() if k != "kind"}, f"{where} ({kind})")


def from_dict(raw: dict[str, Any]) -> PipelineConfig:
    raw = dict(raw or {})
    stages = raw.pop("stages", [])
    if not isinstance(stages, list):
        raise ValueError(f"stages: expected a list of stages, got {stages!r}")
    config = _build(PipelineConfig, raw, "pipeline config")
    return dataclasses.replace(config, stages=tuple(build_stage(s, f"stages[{i}]") for i, s in enumerate(stages)))


def parse_value(text: str, kind: Any, where: str) -> Any:
    """A command-line string as a field of type `kind` (an int field takes 0.5 only if float)."""
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise ValueError(f"{where}: expected a {kind.__name__}, got {text!r}") from None
    if float in typing.get_args(kind) and str in typing.get_args(kind):  # a number or a word (alpha: auto)
        try:
            return float(text)
        except ValueError:
            return text
    if kind is not str and _base_type(kind) is not kind and text.lower() in ("", "none", "null"):
        return None
    if _base_type(kind) in (int, float) and _base_type(kind) is not kind:
        return parse_value(text, _base_type(kind), where)
    return text


def _replace_path(config, path: list[str], text: str, where: str):
    """`config` with the field at `path` (nested sections) set from the string `text`."""
    names = {f.name for f in fields(config) if f.init}
    if path[0] not in names:
        raise ValueError(f"override {where}: {type(config).__name__} has no field {path[0]!r}; known: {sorted(names)}")
    current = getattr(config, path[0])
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"override {where}: {path[0]!r} has no fields")
        value = _replace_path(current, path[1:], text, where)
    else:
        value = parse_value(text, _field_types(type(config))[path[0]], f"override {where}")
    return dataclasses.replace(config, **{path[0]: value})


def apply_overrides(config: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """Apply `SECTION.FIELD=VALUE` overrides. SECTION is data/model/ray/eval (or a nested section
    such as eval.sampling), a stage name (`rft.sampling.top_k=8`), or empty for a top-level field
    (`out_dir=...`)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form SECTION.FIELD=VALUE")
        key, text = item.split("=", 1)
        path = key.split(".")
        if path[0] == "stages":
            raise ValueError(f"override {item!r}: name a stage by its name, e.g. rft.alpha=0.8")
        if len(path) > 1 and path[0] not in {f.name for f in fields(config)}:
            stage = config.stage(path[0])  # raises for an unknown stage name
            new = _replace_path(stage, path[1:], text, item)
            config = dataclasses.replace(config, stages=tuple(new if s.name == path[0] else s for s in config.stages))
        else:
            config = _replace_path(config, path, text, item)
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no such config file: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return apply_overrides(from_dict(raw), overrides or []).validate()


# -- command-line flags from config fields ----------------------------------------------------

def add_config_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (),
                     required: tuple[str, ...] = ()) -> None:
    """One `--flag-name` per field of the dataclass `cls` (nested configs flattened), with the
    field's type, default and help text; `required` fields have no default."""
    types = _field_types(cls)
    for f in fields(cls):
        if not f.init or f.name in skip:
            continue
        kind = types[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(kind):
            add_config_flags(parser, kind, skip)
            continue
        if f.name in required:
            parser.add_argument("--" + f.name.replace("_", "-"), type=_base_type(kind), required=True,
                                help=f.metadata.get("help", ""))
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        kind = _base_type(kind)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=kind if kind in (int, float, str) else str, default=default,
                                help=f"{help_text} (default: {default})")


def config_from_flags(cls, args: argparse.Namespace, **values):
    """The dataclass `cls` from the flags `add_config_flags` made (nested configs too)."""
    types = _field_types(cls)
    kwargs = {}
    for f in fields(cls):
        if not f.init:
            continue
        if f.name in values:
            kwargs[f.name] = values[f.name]
        elif dataclasses.is_dataclass(types[f.name]):
            kwargs[f.name] = config_from_flags(types[f.name], args)
        elif hasattr(args, f.name):
            kwargs[f.name] = getattr(args, f.name)
    return cls(**kwargs)
