"""Peak memory of the pipeline's processes, estimated from a config before anything runs: a learner
(a BC or CAT-K SFT step, an MPO update) and a rollout worker (closed-loop rollouts, the reference's
log-probs, rewards). The preflight compares it with each node's free memory; the supervised learner
loop splits a batch into micro-batches that fit a stage's `memory_budget_gb` with it.

Activations grow linearly with the padded slots a forward/backward holds, so each kind of work is
described by three measured numbers (a `Fit`): peak = fixed + agent x agent slots + segment x
map-segment slots, where the slots are

    bc, catk   a batch of n scenes padded to A agents and M map segments: n A agent slots, n M
               segment slots (CAT-K: one rollout per scene, as the supervised loop runs it)
    mpo        one part of the update (a scene's chunk of r rollouts, `rollouts_per_backward`): r A
               agent slots, M segment slots (the map is encoded once per part); with backward per
               part, more scenes per learner add time, not memory
    rollout    one closed-loop batch of n scenes x R rollouts (`scenarios_per_rollout_batch`):
               n R A agent slots, n M segment slots

and `fixed` holds the weights, gradients and AdamW state (the worker: the policy and the
reference) and the runtime's own. The fits come from `benchmarks/bench_memory.py` (command and
processor beside each entry of MEASURED; BENCHMARKS.md has its tables), on the largest real WOMD
scenes. A config is estimated at the worst case WOMD allows: the slots' caps (BC keeps at most 64
agents, CAT-K and rollouts 128 sim agents, every scene at most 2048 map segments: build_scene and
smart_r1.tokens.cache.STAGE_OPTIONS).

Measured on a CPU, stated for a GPU: the tensors are the same (bench_memory.py's docstring says
why); a process on a GPU adds the CUDA context and library workspaces (CUDA_CONTEXT, outside
torch's allocator) and the caching allocator's reserve and fragmentation (ALLOCATOR_MARGIN of the
live bytes); a CPU process gets the same margin for its allocator. Precision: an entry measured in
bfloat16 holds its activations at half the float32 size wherever autocast computes in bfloat16, so
for a float32 process its activation terms are doubled (an upper bound); a float32 entry bounds a
bfloat16 process from above as it is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from smart_r1.config import BCStage, CatKStage, MPOStage, PipelineConfig
from smart_r1.model import precision
from smart_r1.model.config import ModelConfig
from smart_r1.tokens.scene import SceneBatch, micro_batches

GiB = 2 ** 30
CUDA_CONTEXT = 1 * GiB  # CUDA context, cuBLAS / cuDNN workspaces: never in torch's allocated bytes
ALLOCATOR_MARGIN = 0.20  # allocator reserve and fragmentation above the live bytes
CARDS = {"24 GB": 22 * GiB, "80 GB": 79 * GiB}  # usable memory of a 24 GB and an 80 GB card
BC_AGENTS, SIM_AGENTS, MAP_SEGMENTS = 64, 128, 2048  # a WOMD scene's caps (module docstring)


@dataclass(frozen=True)
class Fit:
    """peak bytes = fixed + agent * agent slots + segment * segment slots (module docstring)."""

    fixed: int
    agent: int
    segment: int

    def bytes(self, agent_slots: float, segment_slots: float) -> int:
        return int(self.fixed + self.agent * agent_slots + self.segment * segment_slots)

    def activations(self, agent_slots: float, segment_slots: float) -> int:
        return int(self.agent * agent_slots + self.segment * segment_slots)


@dataclass(frozen=True)
class UnitCosts:
    """The measured fits of one model preset, vocabulary size and precision."""

    preset: str
    vocab_size: int
    precision: str  # "bfloat16" or "float32"
    bc: Fit
    catk: Fit
    mpo: Fit
    rollout: Fit

    @classmethod
    def from_fits(cls, preset: str, vocab_size: int, precision: str, fits: dict) -> "UnitCosts":
        """From bench_memory.py's least-squares fits {kind: (fixed, agent, segment)} (negative
        slopes, from noise, are taken as 0)."""
        return cls(preset, vocab_size, precision,
                   **{k: Fit(*(max(0, round(x)) for x in fits[k])) for k in ("bc", "catk", "mpo", "rollout")})

    def as_source(self) -> str:
        """This entry as the Python that MEASURED records."""
        fits = ", ".join(f"{k}=Fit({v.fixed}, {v.agent}, {v.segment})"
                         for k, v in ((k, getattr(self, k)) for k in ("bc", "catk", "mpo", "rollout")))
        return f"UnitCosts({self.preset!r}, {self.vocab_size}, {self.precision!r}, {fits})"

    def scaled(self, factor: float) -> "UnitCosts":
        """Activation terms times `factor`, fixed terms as they are."""
        return dataclasses.replace(self, **{k: Fit(f.fixed, round(f.agent * factor), round(f.segment * factor))
                                            for k in ("bc", "catk", "mpo", "rollout")
                                            for f in [getattr(self, k)]})


# Measured by benchmarks/bench_memory.py (BENCHMARKS.md, "Memory per learner and worker") on the
# 2-core AMD EPYC dev machine (AVX512-BF16), torch 2.13.0+cpu; the commands:
MEASURED: tuple[UnitCosts, ...] = (
    # OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_memory.py --threads 1
    UnitCosts('default', 2048, 'bfloat16', bc=Fit(145760078, 9095794, 162196), catk=Fit(210518016, 9361078, 171621),
              mpo=Fit(162954009, 8692840, 173185), rollout=Fit(144395769, 2195024, 9746)),
    # bench_memory.py --preset test --vocab 64 --precision float32 --fit-only --scenes 1,2
    UnitCosts('test', 64, 'float32', bc=Fit(90140672, 749221, 11511), catk=Fit(90124288, 743845, 11837),
              mpo=Fit(89274772, 711024, 11406), rollout=Fit(188762891, 6896, 101)),
)


def unit_costs(preset: str, vocab_size: int, precision: str) -> UnitCosts:
    """The measured entry for a preset, vocabulary size and precision ("bfloat16" / "float32"):
    the same preset's entry at the nearest vocabulary size, the precision bounded as the module
    docstring says."""
    entries = [e for e in MEASURED if e.preset == preset] or [e for e in MEASURED if e.preset == "default"]
    if not entries:
        raise ValueError("no measured memory costs (smart_r1/distributed/memory_estimate.py: MEASURED)")
    same = [e for e in entries if e.precision == precision] or entries
    entry = min(same, key=lambda e: (abs(e.vocab_size - vocab_size), -e.vocab_size))
    return entry.scaled(2.0) if entry.precision == "bfloat16" and precision == "float32" else entry


def model_costs(cfg: ModelConfig, precision: str) -> UnitCosts:
    """The entry of the preset a model config is (vocabulary and dropout aside); a config that is
    no preset gets the `default` preset's, the largest measured."""
    for name in ("default", "cpu", "test"):
        if ModelConfig.preset(name, vocab_size=cfg.vocab_size, dropout=cfg.dropout) == cfg:
            return unit_costs(name, cfg.vocab_size, precision)
    return unit_costs("default", cfg.vocab_size, precision)


def with_margin(live_bytes: float, gpu: bool) -> int:
    """What a process needs on its device for `live_bytes` of tensors (module docstring)."""
    return int(live_bytes * (1 + ALLOCATOR_MARGIN) + (CUDA_CONTEXT if gpu else 0))


def gpu_bytes(live_bytes: float) -> int:
    """`with_margin` on a GPU: what bench_memory.py's tables compare with a card's memory."""
    return with_margin(live_bytes, gpu=True)


def activation_budget(budget_bytes: float, fixed: int, gpu: bool) -> float:
    """Activation bytes one micro-batch may take under a process budget (the inverse of
    `with_margin`, less the fixed part)."""
    return (budget_bytes - (CUDA_CONTEXT if gpu else 0)) / (1 + ALLOCATOR_MARGIN) - fixed


def supervised_fits(stage: BCStage | CatKStage, costs: UnitCosts) -> tuple[int, int, int]:
    """(fixed, agent, segment) of one step of a supervised stage: CAT-K's log term
    (`bc_weight`) runs a BC forward on the same batch inside the same graph, so its activations
    add."""
    if stage.kind == "bc":
        return costs.bc.fixed, costs.bc.agent, costs.bc.segment
    extra = costs.bc if getattr(stage, "bc_weight", 0.0) else Fit(0, 0, 0)
    return costs.catk.fixed, costs.catk.agent + extra.agent, costs.catk.segment + extra.segment


def micro_batch_scenes(stage: BCStage | CatKStage, costs: UnitCosts, gpu: bool,
                       agents: int, segments: int) -> int:
    """Scenes of `agents` x `segments` slots one micro-batch holds under the stage's
    memory_budget_gb (at least 1; the whole batch without a budget)."""
    if not stage.memory_budget_gb:
        return stage.batch_scenarios
    fixed, agent, segment = supervised_fits(stage, costs)
    room = activation_budget(stage.memory_budget_gb * GiB, fixed, gpu)
    per_scene = agent * agents + segment * segments
    return max(1, min(stage.batch_scenarios, int(room // max(1, per_scene))))


def batch_splitter(stage: BCStage | CatKStage, cfg: ModelConfig,
                   device: torch.device | str) -> Callable[[Sequence[SceneBatch]], list[list[SceneBatch]]]:
    """How a supervised learner cuts a batch (a list of single scenes): into micro-batches whose
    estimated step stays within the stage's memory_budget_gb on `device` (`micro_batches`; a scene
    above it alone); the whole batch without a budget."""
    if not stage.memory_budget_gb:
        return lambda scenes: [list(scenes)]
    device = torch.device(device)
    dtype = precision.compute_dtype(device)
    costs = model_costs(cfg, "bfloat16" if dtype == torch.bfloat16 else "float32")
    fixed, agent, segment = supervised_fits(stage, costs)
    room = activation_budget(stage.memory_budget_gb * GiB, fixed, device.type == "cuda")
    return lambda scenes: micro_batches(scenes, lambda n, a, m: n * (agent * a + segment * m), room)


def stage_peak_bytes(config: PipelineConfig, stage) -> dict[str, int]:
    """Peak bytes of a learner running `stage` and of a rollout worker serving it, on their devices
    (margin included), at a WOMD scene's worst-case slots."""
    r = config.ray
    learner_precision = _precision(config.model.precision, r.use_gpu)
    worker_gpu = r.gpus_per_rollout_worker > 0
    learner = unit_costs(config.model.preset, config.model.vocab_size, learner_precision)
    worker = unit_costs(config.model.preset, config.model.vocab_size, _precision(config.model.precision, worker_gpu))
    n_worker = max(1, r.scenarios_per_rollout_batch)
    rollouts = max(config.eval.num_rollouts, getattr(stage, "num_rollouts", 0))  # every stage is evaluated
    out = {"rollout_worker": with_margin(worker.rollout.bytes(n_worker * rollouts * SIM_AGENTS, n_worker * MAP_SEGMENTS),
                                         worker_gpu)}
    if isinstance(stage, MPOStage):
        chunk = stage.rollouts_per_backward or stage.num_rollouts
        out["learner"] = with_margin(learner.mpo.bytes(min(chunk, stage.num_rollouts) * SIM_AGENTS, MAP_SEGMENTS),
                                     r.use_gpu)
    else:
        agents = BC_AGENTS if stage.kind == "bc" else SIM_AGENTS
        n = micro_batch_scenes(stage, learner, r.use_gpu, agents, MAP_SEGMENTS)
        fixed, agent, segment = supervised_fits(stage, learner)
        out["learner"] = with_margin(fixed + n * (agent * agents + segment * MAP_SEGMENTS), r.use_gpu)
    return out


def estimate_peak_bytes(config: PipelineConfig) -> dict[str, int]:
    """Peak bytes, over the config's stages, of one process of each kind on its own device:
    {"learner": ..., "rollout_worker": ...} (a GPU learner's: GPU memory, margin and CUDA context
    included; a CPU process's: its resident memory). WOMD's worst-case scene sizes; the measured
    per-unit costs of the model preset (module docstring)."""
    peaks = {"learner": 0, "rollout_worker": 0}
    for stage in config.stages:
        for kind, value in stage_peak_bytes(config, stage).items():
            peaks[kind] = max(peaks[kind], value)
    return peaks


def _precision(name: str, gpu: bool) -> str:
    """The precision a process computes in: `auto` is bfloat16 on a GPU and, unknown CPU, float32
    on a CPU (the larger: an upper bound)."""
    if name == "auto":
        return "bfloat16" if gpu else "float32"
    return name


def fits_cards(live_bytes: float) -> dict[str, bool]:
    """Whether a GPU process with `live_bytes` of tensors fits each card of CARDS."""
    need = gpu_bytes(live_bytes)
    return {name: need <= cap for name, cap in CARDS.items()}


def scenes_in(budget_gb: float, fit: Fit, agents: int, segments: int, gpu: bool = True) -> int:
    """How many worst-case scenes one step's batch (or rollouts, for mpo: agents already times
    rollouts) holds within `budget_gb` (0 if not even one)."""
    room = activation_budget(budget_gb * GiB, fit.fixed, gpu)
    return max(0, math.floor(room / max(1, fit.activations(agents, segments))))
