"""A trained policy for rollouts: load a checkpoint onto the best device, and sample closed-loop
rollouts of one scenario as WOSAC states."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from smart_r1.config import SamplingConfig
from smart_r1.model.checkpoint import load_checkpoint
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.rollout.closed_loop import rollout_records
from smart_r1.rollout.sampling import Sampler
from smart_r1.types import ScenarioRecord


def load_policy(checkpoint: str | Path) -> SmartTiny:
    """The SMART-tiny model of a checkpoint, on the GPU when there is one, in eval mode;
    FileNotFoundError / ValueError saying what is wrong with the file."""
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    return load_checkpoint(checkpoint, "cuda" if torch.cuda.is_available() else "cpu")


def sample_states(model: SmartTiny, record: ScenarioRecord, num_rollouts: int, seed: int,
                  sampling: SamplingConfig = SamplingConfig()) -> np.ndarray:
    """float32 [R, S, 80, 4]: closed-loop rollouts of one scenario, sim agents in record order."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    sampler = Sampler(**dataclasses.asdict(sampling), generator=generator)
    (rollout,) = rollout_records(model, [record], num_rollouts, sampler)
    if rollout.scenario_id != record.scenario_id or not np.array_equal(rollout.agent_ids, record.sim_agent_ids):
        raise ValueError(f"scenario {record.scenario_id}: the model's rollouts are for scenario "
                         f"{rollout.scenario_id} / other agents")
    return rollout.states
