"""Rollout workers: Ray actors that hold a policy copy, run closed-loop rollouts of scenario
shards, score them with the fast WOSAC metrics inside the actor, and return `Experience`
records (or per-scenario metrics for evaluation) through the object store.

Weights travel as one `ray.put` per update: every task carries `(version, [weights_ref])`; an
actor fetches the weights only when the version differs from the one it holds (explicit
`update_weights`). A task retried on a restarted actor therefore runs with the right weights.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass

import numpy as np
import ray
import torch

from smart_r1.types import Experience, RolloutFailure, ScenarioRecord


@dataclass(frozen=True)
class SamplingSpec:
    """How rollouts sample tokens and how they are rewarded (plain values for Ray)."""

    num_rollouts: int = 8
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    collision_weight: float = 1.0
    offroad_weight: float = 1.0
    per_agent_credit: bool = False


class RolloutWorker:
    """One policy copy. `datasets` maps a name ("train", "heldout", "real") to a data path that
    every node can read (a Parquet folder or TFRecord glob); scenarios load on first use."""

    def __init__(self, checkpoint: str, datasets: dict[str, str], device: str = "cpu",
                 threads: int = 1, seed: int = 0, worker_index: int = 0):
        from smart_r1.model.checkpoint import load_checkpoint

        torch.set_num_threads(max(1, int(threads)))
        self.device = torch.device(device if device != "cuda" or torch.cuda.is_available() else "cpu")
        self.model = load_checkpoint(checkpoint, map_location=self.device)
        self.version = -1  # the checkpoint's own weights
        self.datasets = dict(datasets)
        self._records: dict[str, list[ScenarioRecord]] = {}
        self._scenes: dict[tuple[str, int], object] = {}
        self.generator = torch.Generator(device=self.device).manual_seed(seed * 1000 + worker_index)
        self.worker_index = worker_index

    # -- state ---------------------------------------------------------------------------
    def update_weights(self, version: int, state_dict: dict) -> None:
        self.model.load_state_dict(state_dict)
        self.model.eval()
        self.version = version

    def info(self) -> dict:
        import os

        return {"pid": os.getpid(), "version": self.version, "worker_index": self.worker_index}

    def _sync(self, version: int, weights: list) -> None:
        if weights and version != self.version:
            self.update_weights(version, ray.get(weights[0]))

    def records(self, dataset: str) -> list[ScenarioRecord]:
        if dataset not in self._records:
            from smart_r1.data.dataset import iter_scenarios

            self._records[dataset] = list(iter_scenarios(self.datasets[dataset]))
        return self._records[dataset]

    def _scene(self, dataset: str, index: int):
        from smart_r1.tokens.scene import build_scene

        key = (dataset, index)
        if key not in self._scenes:
            self._scenes[key] = build_scene(self.records(dataset)[index], self.model.vocab, agents="sim")
        return self._scenes[key]

    def _sampler(self, spec: SamplingSpec):
        from smart_r1.rollout.sampling import Sampler

        return Sampler(top_k=spec.top_k, top_p=spec.top_p, temperature=spec.temperature, generator=self.generator)

    # -- work ----------------------------------------------------------------------------
    def rollout(self, version: int, weights: list, dataset: str, indices: list[int],
                spec: SamplingSpec) -> list[Experience | RolloutFailure]:
        """Sample and score `spec.num_rollouts` rollouts of each scenario."""
        from smart_r1.metrics import rollout_signals
        from smart_r1.rl.rewards import rollout_rewards
        from smart_r1.rollout.closed_loop import closed_loop, to_rollouts
        self._sync(version, weights)
        sampler = self._sampler(spec)
        out: list[Experience | RolloutFailure] = []
        for index in indices:
            scenario_id = "?"
            try:
                record = self.records(dataset)[index]
                scenario_id = record.scenario_id
                t0 = time.perf_counter()
                scene = self._scene(dataset, index)
                tensors = closed_loop(self.model, scene, spec.num_rollouts, sampler)
                (rollout,) = to_rollouts(scene, tensors)
                t1 = time.perf_counter()
                signals = rollout_signals(record, rollout.states)
                rewards = rollout_rewards(signals.realism.float(), signals.collision, signals.offroad,
                                          spec.collision_weight, spec.offroad_weight, spec.per_agent_credit)
                if not torch.isfinite(rewards).all():
                    raise FloatingPointError("non-finite reward")
                out.append(Experience(
                    scenario_index=index, scenario_id=record.scenario_id, version=self.version,
                    tokens=tensors.tokens[0].cpu().numpy(), poses=tensors.poses[0].cpu().numpy(),
                    log_probs=tensors.log_probs[0].float().cpu().numpy(),
                    rewards=rewards.cpu().numpy().astype(np.float32),
                    realism=signals.realism.float().cpu().numpy(),
                    collision=signals.collision.cpu().numpy(), offroad=signals.offroad.cpu().numpy(),
                    seconds={"rollout": t1 - t0, "reward": time.perf_counter() - t1}))
            except Exception as e:  # one bad scenario must not sink the batch; the learner counts it
                out.append(RolloutFailure(index, scenario_id, f"{type(e).__name__}: {e}\n"
                                          + traceback.format_exc(limit=3)))
        return out

    def evaluate(self, version: int, weights: list, dataset: str, indices: list[int],
                 spec: SamplingSpec) -> list[dict | RolloutFailure]:
        """Per-scenario fast WOSAC metrics of `spec.num_rollouts` sampled rollouts."""
        from smart_r1.metrics import compute_scenario_metrics
        from smart_r1.rollout.closed_loop import closed_loop, to_rollouts
        self._sync(version, weights)
        sampler = self._sampler(spec)
        out: list[dict | RolloutFailure] = []
        for index in indices:
            scenario_id = "?"
            try:
                record = self.records(dataset)[index]
                scenario_id = record.scenario_id
                if not record.sim_agent_mask.any():
                    raise ValueError("no valid sim agents")
                scene = self._scene(dataset, index)
                tensors = closed_loop(self.model, scene, spec.num_rollouts, sampler)
                (rollout,) = to_rollouts(scene, tensors)
                metrics = compute_scenario_metrics(record, torch.as_tensor(rollout.states))
                out.append({"scenario_id": record.scenario_id, **metrics})
            except Exception as e:
                out.append(RolloutFailure(index, scenario_id, f"{type(e).__name__}: {e}"))
        return out

    def num_scenarios(self, dataset: str) -> int:
        return len(self.records(dataset))


def spec_from_stage(stage, num_rollouts: int | None = None) -> SamplingSpec:
    return SamplingSpec(num_rollouts=num_rollouts or stage.num_rollouts, temperature=stage.temperature,
                        top_k=stage.top_k_sampling, collision_weight=stage.collision_weight,
                        offroad_weight=stage.offroad_weight, per_agent_credit=stage.per_agent_credit)


def start_workers(checkpoint: str, datasets: dict[str, str], count: int, cpus: float, gpus: float,
                  seed: int = 0) -> list:
    """`count` rollout actors; each restarts after a crash and retries its unfinished tasks."""
    actor = ray.remote(RolloutWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=-1,
                                              max_task_retries=-1)
    device = "cuda" if gpus > 0 else "cpu"
    return [actor.remote(checkpoint, datasets, device, max(1, int(cpus)), seed, i) for i in range(count)]


def split(indices: list[int], parts: int) -> list[list[int]]:
    """Round-robin shards of indices, one per worker (empty shards dropped)."""
    return [s for s in (indices[i::parts] for i in range(parts)) if s]
