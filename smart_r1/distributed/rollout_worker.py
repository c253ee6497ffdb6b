"""Rollout workers: Ray actors that hold a policy copy, run closed-loop rollouts of scenario
shards, score them with the fast WOSAC metrics inside the actor, and return `Experience`
records (or per-scenario metrics for evaluation) through the object store.

Weights travel as one `ray.put` per update: every task carries `(version, [weights_ref])`; an
actor fetches the weights only when the version differs from the one it holds (explicit
`update_weights`). A task retried on a restarted actor therefore runs with the right weights.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass

import ray
import torch

from smart_r1.config import MPOStage, SamplingConfig
from smart_r1.data.index import scenario_index
from smart_r1.metrics import compute_scenario_metrics
from smart_r1.metrics.signals import travel_ratio
from smart_r1.distributed.worker_kit import peak_rss_mb, weights_ref
from smart_r1.model.checkpoint import load_checkpoint
from smart_r1.model.precision import numerics, set_precision
from smart_r1.ray_runtime import native_noise_filtered
from smart_r1.rl.experience import make_experience, reference_log_probs
from smart_r1.rl.rewards import RewardConfig
from smart_r1.rollout.closed_loop import RolloutTensors, closed_loop, to_rollouts
from smart_r1.rollout.sampling import Sampler
from smart_r1.tokens.scene import SceneBatch, build_scene, collate
from smart_r1.types import Experience, RolloutFailure, ScenarioRecord


@dataclass(frozen=True)
class RolloutSpec:
    """What a rollout task does: how many rollouts per scenario, how they sample, how they are
    rewarded (plain values for Ray); for MPO, `reference`: (the frozen reference checkpoint's bytes
    as an ObjectRef,) when the workers also send its log-probs of their rollouts (else ()); and
    `scenes_per_batch`, how many of a call's scenarios one closed-loop batch simulates together
    (B x num_rollouts rows: the bound on an actor's memory); `seed`: each batch samples from the
    actor's generator reseeded with (seed, the batch's first scenario index), so a scenario's
    rollouts do not depend on which actor drew it or what that actor ran before (evaluation passes
    the run's seed, RL one per step: `mpo_loop.step_sampling_seed`; None: the actor's own stream)."""

    num_rollouts: int = 8
    sampling: SamplingConfig = SamplingConfig()
    reward: RewardConfig = RewardConfig()
    reference: tuple = ()
    scenes_per_batch: int = 1
    seed: int | None = None
    dataset: str = "train"  # RL: the data set the scenarios are drawn from (an RFT stage's train_data)

    @classmethod
    def of_stage(cls, stage: MPOStage, scenes_per_batch: int = 1) -> "RolloutSpec":
        return cls(stage.num_rollouts, stage.sampling, RewardConfig.of_stage(stage), scenes_per_batch=scenes_per_batch,
                   dataset=stage.train_data)


@dataclass(frozen=True)
class _Ready:
    """A scenario of a call, read and tokenised: its place in the call, its index, its record and
    its scene on its own (B = 1)."""

    slot: int
    index: int
    record: ScenarioRecord
    scene: SceneBatch


@dataclass(frozen=True)
class _Simulated:
    """One scenario's rollouts cut from its batch: tensors [1, R, A_i, ...], ref_log_probs
    [1, R, A_i, 16] or None, and its share of the batch's rollout and reference seconds."""

    tensors: RolloutTensors
    ref_log_probs: torch.Tensor | None
    rollout_seconds: float
    reference_seconds: float


def _failure(index: int, scenario_id: str, error: Exception) -> RolloutFailure:
    return RolloutFailure(index, scenario_id, f"{type(error).__name__}: {error}\n" + traceback.format_exc(limit=3))


SCENE_CACHE = 64  # tokenised scenes an actor keeps (~270 KB each on WOMD): evaluation re-scores the same few


class RolloutWorker:
    """One policy copy. `checkpoint` is the starting checkpoint's bytes (through Ray's object
    store: `start_workers`). `datasets` maps a name ("train", "sumo_heldout", "real_report", an RFT
    stage's `train_data` mixture, ...) to data that every node can read (a Parquet folder or URI, a
    TFRecord glob, or a list of Parquet folders read as one index: `scenario_index`).

    An actor reads only the scenarios it is handed: each dataset is opened as an index over its
    shards' footers (`smart_r1.data.index`), which decodes the row groups of the scenarios asked
    for and keeps the last two; the last SCENE_CACHE tokenised scenes are kept too. Its memory
    does not grow with the dataset.

    `precision` is `model.precision`, set here for the actor's process (it inherits nothing from
    the driver's environment; None: leave the process's choice alone, for a worker made in a
    test's own process); `numerics` is what it resolved to on the actor's device, which every
    experience carries to the learner."""

    def __init__(self, checkpoint: bytes, datasets: dict[str, str], device: str = "cpu",
                 threads: int = 1, seed: int = 0, worker_index: int = 0, precision: str | None = None):
        torch.set_num_threads(max(1, int(threads)))
        if precision is not None:
            set_precision(precision)
        self.device = torch.device(device if device != "cuda" or torch.cuda.is_available() else "cpu")
        self.numerics = numerics(self.device)
        self.model = load_checkpoint(checkpoint, map_location=self.device)
        self.version = -1  # the checkpoint's own weights
        self.reference, self._reference_ref = None, None  # MPO's frozen reference, when asked for
        self.datasets = dict(datasets)
        self._indexes: dict[str, object] = {}  # dataset name -> ShardIndex (or MemoryIndex for a TFRecord)
        self._scenes: OrderedDict[tuple[str, int], SceneBatch] = OrderedDict()  # least recently used first
        self.generator = torch.Generator(device=self.device).manual_seed(seed * 1000 + worker_index)
        self.worker_index = worker_index

    # -- state ---------------------------------------------------------------------------
    def update_weights(self, version: int, state_dict: dict) -> None:
        self.model.load_state_dict(state_dict)
        self.model.eval()
        self.version = version

    def info(self) -> dict:
        return {"pid": os.getpid(), "version": self.version, "worker_index": self.worker_index,
                "peak_rss_mb": peak_rss_mb(), "numerics": self.numerics}

    def _sync(self, version: int, weights: list) -> None:
        if weights and version != self.version:
            self.update_weights(version, ray.get(weights[0]))

    def _index(self, dataset: str):
        if dataset not in self._indexes:
            self._indexes[dataset] = scenario_index(self.datasets[dataset])
        return self._indexes[dataset]

    def record(self, dataset: str, index: int) -> ScenarioRecord:
        """Scenario `index` of a dataset (decoding its row group unless it is still cached)."""
        return self._index(dataset).read([index])[0]

    def _scene(self, dataset: str, index: int, record: ScenarioRecord) -> SceneBatch:
        key = (dataset, index)
        if key in self._scenes:
            self._scenes.move_to_end(key)
        else:
            # every sim agent (WOSAC scores them all; a converted scene may hold more than WOMD's 128)
            self._scenes[key] = build_scene(record, self.model.vocab, agents="sim",
                                            max_agents=max(128, int(record.sim_agent_mask.sum())))
            if len(self._scenes) > SCENE_CACHE:
                self._scenes.popitem(last=False)
        return self._scenes[key]

    def _reference(self, spec: RolloutSpec):
        """The frozen reference the spec names, or None. Every learner rank names the same
        checkpoint ObjectRef (the stage's, put by the driver), so it is loaded once per stage."""
        if not spec.reference:
            return None
        if self._reference_ref != spec.reference[0].hex():
            self.reference = load_checkpoint(ray.get(spec.reference[0]), map_location=self.device)
            self.reference.requires_grad_(False).eval()
            self._reference_ref = spec.reference[0].hex()
        return self.reference

    def _sampler(self, spec: RolloutSpec) -> Sampler:
        return Sampler(**dataclasses.asdict(spec.sampling), generator=self.generator)

    # -- work ----------------------------------------------------------------------------
    def rollout(self, version: int, weights: list, dataset: str, indices: list[int],
                spec: RolloutSpec) -> list[Experience | RolloutFailure]:
        """Sample `spec.num_rollouts` rollouts of each scenario and score them into experience."""
        self._sync(version, weights)

        def finish(item: _Ready, sim: _Simulated) -> Experience:
            return make_experience(item.index, item.record, item.scene, sim.tensors, self.version, spec.reward,
                                   rollout_seconds=sim.rollout_seconds, ref_log_probs=sim.ref_log_probs,
                                   reference_seconds=sim.reference_seconds, numerics=self.numerics)
        return self._run(dataset, indices, spec, finish)

    def score_scenarios(self, version: int, weights: list, dataset: str, indices: list[int],
                        spec: RolloutSpec) -> list[dict | RolloutFailure]:
        """Per-scenario fast WOSAC metrics of `spec.num_rollouts` sampled rollouts."""
        self._sync(version, weights)

        def finish(item: _Ready, sim: _Simulated) -> dict:
            (rollout,) = to_rollouts(item.scene, sim.tensors)
            return {"scenario_id": item.record.scenario_id,
                    **compute_scenario_metrics(item.record, torch.as_tensor(rollout.states)),
                    "travel_ratio": travel_ratio(item.record, rollout.states)}
        return self._run(dataset, indices, spec, finish, need_sim_agents=True)

    def _run(self, dataset: str, indices: list[int], spec: RolloutSpec, finish,
             need_sim_agents: bool = False) -> list:
        """What `rollout` and `score_scenarios` share: read and tokenise each scenario on its own,
        simulate them `spec.scenes_per_batch` at a time in one closed-loop batch, then
        `finish(item, simulated)` each on its own. Results in the order of `indices`.

        One bad scenario must not sink the others (the learner counts it, never scores it): a
        scenario that fails to read, tokenise or finish becomes a RolloutFailure alone, and a
        batch that raises is simulated again scene by scene."""
        out: list = [None] * len(indices)
        ready: list[_Ready] = []
        for slot, index in enumerate(indices):
            scenario_id = "?"
            try:
                record = self.record(dataset, index)
                scenario_id = record.scenario_id
                if need_sim_agents and not record.sim_agent_mask.any():
                    raise ValueError("no valid sim agents")
                ready.append(_Ready(slot, index, record, self._scene(dataset, index, record)))
            except Exception as e:
                out[slot] = _failure(index, scenario_id, e)
        sampler, reference = self._sampler(spec), self._reference(spec)
        size = max(1, spec.scenes_per_batch)
        for start in range(0, len(ready), size):
            group = ready[start:start + size]
            try:
                done = list(zip(group, self._simulate(group, spec, sampler, reference)))
            except Exception as e:
                if len(group) == 1:
                    out[group[0].slot] = _failure(group[0].index, group[0].record.scenario_id, e)
                    continue
                done = []
                for item in group:  # again scene by scene: only the bad one fails
                    try:
                        done += list(zip([item], self._simulate([item], spec, sampler, reference)))
                    except Exception as e_item:
                        out[item.slot] = _failure(item.index, item.record.scenario_id, e_item)
            for item, sim in done:
                try:
                    out[item.slot] = finish(item, sim)
                except Exception as e:
                    out[item.slot] = _failure(item.index, item.record.scenario_id, e)
        return out

    def _simulate(self, group: list["_Ready"], spec: RolloutSpec, sampler: Sampler,
                  reference) -> list["_Simulated"]:
        """The rollouts of a group of scenes, sampled in one closed-loop batch (B scenes x R
        rollouts rows, agents padded to the group's most), then cut per scene. Padding agent and
        map slots are masked out of every attention, so a scene's rollouts follow the same
        distribution as alone (tests/rollout/test_batched_scenes.py)."""
        if spec.seed is not None:  # the sampler draws from self.generator
            self.generator.manual_seed(spec.seed * 1_000_003 + group[0].index)
        batch = group[0].scene if len(group) == 1 else collate([item.scene for item in group])
        t0 = time.perf_counter()
        tensors = closed_loop(self.model, batch, spec.num_rollouts, sampler)  # [B, R, A, ...]
        t1 = time.perf_counter()
        ref = None if reference is None else reference_log_probs(reference, batch, tensors, spec.sampling)
        t2 = time.perf_counter()  # ref: [B, R, A, 16]
        out = []
        for i, item in enumerate(group):  # the batch's seconds shared evenly by its scenes
            a = item.scene.agent_mask.shape[1]
            out.append(_Simulated(tensors.scene(i, a), None if ref is None else ref[i:i + 1, :, :a],
                                  (t1 - t0) / len(group), (t2 - t1) / len(group)))
        return out

    def num_scenarios(self, dataset: str) -> int:
        """Scenarios in a dataset, from its shards' footers."""
        return len(self._index(dataset))


def start_workers(checkpoint, datasets: dict[str, str], count: int, cpus: float, gpus: float,
                  seed: int = 0, max_restarts: int = 3, precision: str = "auto") -> list:
    """`count` rollout actors; each restarts after a crash (at most `max_restarts` times) and
    retries its unfinished tasks, so a permanently failing actor ends as a failed task, not a hang.
    Each computes in `precision` (`model.precision`, resolved on its own device).

    `checkpoint`: an ObjectRef of a checkpoint's bytes, or a path that this process (the driver)
    reads and puts into the object store once; every actor (and a restarted one) gets the bytes
    from there, never the path."""
    checkpoint = weights_ref(checkpoint)
    actor = ray.remote(RolloutWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=max_restarts,
                                              max_task_retries=max_restarts)
    device = "cuda" if gpus > 0 else "cpu"
    with native_noise_filtered():  # Ray's warning about the checkpoint ref (ray_runtime.RAY_NOISE)
        return [actor.remote(checkpoint, datasets, device, max(1, int(cpus)), seed, i, precision)
                for i in range(count)]

