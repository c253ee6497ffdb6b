"""Rollout workers: Ray actors that hold a policy copy, run closed-loop rollouts of scenario
shards, score them with the fast WOSAC metrics inside the actor, and return `Experience`
records (or per-scenario metrics for evaluation) through the object store.

Weights travel as one `ray.put` per update: every task carries `(version, [weights_ref])`; an
actor fetches the weights only when the version differs from the one it holds (explicit
`update_weights`). A task retried on a restarted actor therefore runs with the right weights.
"""

from __future__ import annotations

import copy
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
from smart_r1.distributed.worker_kit import peak_rss_mb, weights_ref
from smart_r1.model.checkpoint import load_checkpoint
from smart_r1.rl.experience import make_experience, reference_log_probs
from smart_r1.rl.rewards import RewardConfig
from smart_r1.rollout.closed_loop import closed_loop, to_rollouts
from smart_r1.rollout.sampling import Sampler
from smart_r1.tokens.scene import SceneBatch, build_scene
from smart_r1.types import Experience, RolloutFailure, ScenarioRecord


@dataclass(frozen=True)
class RolloutSpec:
    """What a rollout task does: how many rollouts per scenario, how they sample, how they are
    rewarded (plain values for Ray), and, for MPO, `reference`: (the frozen reference's weights as
    an ObjectRef,) when the workers also send its log-probs of their rollouts (else ())."""

    num_rollouts: int = 8
    sampling: SamplingConfig = SamplingConfig()
    reward: RewardConfig = RewardConfig()
    reference: tuple = ()

    @classmethod
    def of_stage(cls, stage: MPOStage) -> "RolloutSpec":
        return cls(stage.num_rollouts, stage.sampling, RewardConfig.of_stage(stage))


SCENE_CACHE = 64  # tokenised scenes an actor keeps (~270 KB each on WOMD): evaluation re-scores the same few


class RolloutWorker:
    """One policy copy. `checkpoint` is the starting checkpoint's bytes (through Ray's object
    store: `start_workers`). `datasets` maps a name ("train", "heldout", "real") to data that
    every node can read (a Parquet folder or URI, or a TFRecord glob).

    An actor reads only the scenarios it is handed: each dataset is opened as an index over its
    shards' footers (`smart_r1.data.index`), which decodes the row groups of the scenarios asked
    for and keeps the last two; the last SCENE_CACHE tokenised scenes are kept too. Its memory
    does not grow with the dataset."""

    def __init__(self, checkpoint: bytes, datasets: dict[str, str], device: str = "cpu",
                 threads: int = 1, seed: int = 0, worker_index: int = 0):
        torch.set_num_threads(max(1, int(threads)))
        self.device = torch.device(device if device != "cuda" or torch.cuda.is_available() else "cpu")
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
                "peak_rss_mb": peak_rss_mb()}

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
            self._scenes[key] = build_scene(record, self.model.vocab, agents="sim")
            if len(self._scenes) > SCENE_CACHE:
                self._scenes.popitem(last=False)
        return self._scenes[key]

    def _reference(self, spec: RolloutSpec):
        """The frozen reference the spec names (fetched once per stage), or None."""
        if not spec.reference:
            return None
        if self._reference_ref != spec.reference[0].hex():
            self.reference = copy.deepcopy(self.model).requires_grad_(False)
            self.reference.load_state_dict(ray.get(spec.reference[0]))
            self.reference.eval()
            self._reference_ref = spec.reference[0].hex()
        return self.reference

    def _sampler(self, spec: RolloutSpec) -> Sampler:
        return Sampler(**dataclasses.asdict(spec.sampling), generator=self.generator)

    # -- work ----------------------------------------------------------------------------
    def rollout(self, version: int, weights: list, dataset: str, indices: list[int],
                spec: RolloutSpec) -> list[Experience | RolloutFailure]:
        """Sample `spec.num_rollouts` rollouts of each scenario and score them into experience."""
        self._sync(version, weights)
        sampler = self._sampler(spec)
        reference = self._reference(spec)
        out: list[Experience | RolloutFailure] = []
        for index in indices:
            scenario_id = "?"
            try:
                record = self.record(dataset, index)
                scenario_id = record.scenario_id
                t0 = time.perf_counter()
                scene = self._scene(dataset, index, record)
                tensors = closed_loop(self.model, scene, spec.num_rollouts, sampler)
                t1 = time.perf_counter()
                ref_log_probs = None if reference is None else reference_log_probs(reference, scene, tensors,
                                                                                   spec.sampling)
                out.append(make_experience(index, record, scene, tensors, self.version, spec.reward,
                                           rollout_seconds=t1 - t0, ref_log_probs=ref_log_probs,
                                           reference_seconds=time.perf_counter() - t1))
            except Exception as e:  # one bad scenario must not sink the batch; the learner counts it
                out.append(RolloutFailure(index, scenario_id, f"{type(e).__name__}: {e}\n"
                                          + traceback.format_exc(limit=3)))
        return out

    def score_scenarios(self, version: int, weights: list, dataset: str, indices: list[int],
                        spec: RolloutSpec) -> list[dict | RolloutFailure]:
        """Per-scenario fast WOSAC metrics of `spec.num_rollouts` sampled rollouts."""
        self._sync(version, weights)
        sampler = self._sampler(spec)
        out: list[dict | RolloutFailure] = []
        for index in indices:
            scenario_id = "?"
            try:
                record = self.record(dataset, index)
                scenario_id = record.scenario_id
                if not record.sim_agent_mask.any():
                    raise ValueError("no valid sim agents")
                scene = self._scene(dataset, index, record)
                tensors = closed_loop(self.model, scene, spec.num_rollouts, sampler)
                (rollout,) = to_rollouts(scene, tensors)
                metrics = compute_scenario_metrics(record, torch.as_tensor(rollout.states))
                out.append({"scenario_id": record.scenario_id, **metrics})
            except Exception as e:
                out.append(RolloutFailure(index, scenario_id, f"{type(e).__name__}: {e}"))
        return out

    def num_scenarios(self, dataset: str) -> int:
        """Scenarios in a dataset, from its shards' footers."""
        return len(self._index(dataset))


def start_workers(checkpoint, datasets: dict[str, str], count: int, cpus: float, gpus: float,
                  seed: int = 0, max_restarts: int = 3) -> list:
    """`count` rollout actors; each restarts after a crash (at most `max_restarts` times) and
    retries its unfinished tasks, so a permanently failing actor ends as a failed task, not a hang.

    `checkpoint`: an ObjectRef of a checkpoint's bytes, or a path that this process (the driver)
    reads and puts into the object store once; every actor (and a restarted one) gets the bytes
    from there, never the path."""
    checkpoint = weights_ref(checkpoint)
    actor = ray.remote(RolloutWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=max_restarts,
                                              max_task_retries=max_restarts)
    device = "cuda" if gpus > 0 else "cpu"
    return [actor.remote(checkpoint, datasets, device, max(1, int(cpus)), seed, i) for i in range(count)]

