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
for a float32 process it is doubled (every term: a worker's fixed term holds its reference pass; an
upper bound, by the weights' and optimiser state's size); a float32 entry bounds a bfloat16
process from above as it is.
"""

from __future__ import annotations

import dataclasses
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
# A rollout worker's fit holds from 2048 agent-rollouts up (16 rollouts of 128 agents); below, its
# peak is its reference pass's (~512 agent-rollouts at a time), flat: 1.19, 1.21, 1.20 GiB measured
# at 4, 8, 16 rollouts of a 128-agent scene (`default` preset, bfloat16), 1.71 at 32.
ROLLOUT_FIT_FROM = 2048


@dataclass(frozen=True)
class Fit:
    """peak bytes = fixed + agent * agent slots + segment * segment slots (module docstring)."""

    fixed: int
    agent: int
    segment: int

    def bytes(self, agent_slots: float, segment_slots: float) -> int:
        return int(self.fixed + self.agent * agent_slots + self.segment * segment_slots)


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
        """Every term times `factor` (the fixed ones too: a worker's holds its reference pass)."""
        return dataclasses.replace(self, **{k: Fit(round(f.fixed * factor), round(f.agent * factor),
                                                   round(f.segment * factor))
                                            for k in ("bc", "catk", "mpo", "rollout")
                                            for f in [getattr(self, k)]})


# Measured by benchmarks/bench_memory.py (BENCHMARKS.md, "Memory per learner and worker") on the
# 2-core AMD EPYC dev machine (AVX512-BF16), torch 2.13.0+cpu; the commands:
MEASURED: tuple[UnitCosts, ...] = (
    # OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_memory.py --threads 1 (bc, catk, mpo), and
    # rollout from the same with --kinds rollout (16 and 32 rollouts; fits 16 rollouts and up)
    UnitCosts('default', 2048, 'bfloat16', bc=Fit(145760078, 9095794, 162196), catk=Fit(210518016, 9361078, 171621),
              mpo=Fit(162954009, 8692840, 173185), rollout=Fit(746489308, 266026, 0)),
    # ... --preset cpu --vocab 1024 --precision float32 --fit-only --scenes 1,2 --kinds bc,catk,mpo,rollout
    UnitCosts('cpu', 1024, 'float32', bc=Fit(92663808, 2367230, 37696), catk=Fit(91762688, 2504635, 38595),
              mpo=Fit(93244777, 2440784, 38907), rollout=Fit(20558747, 127276, 2044)),
    # ... --preset test --vocab 64 --precision float32 --fit-only --scenes 1,2 --kinds bc,catk,mpo,rollout
    UnitCosts('test', 64, 'float32', bc=Fit(89628672, 751991, 11458), catk=Fit(89526272, 750904, 11300),
              mpo=Fit(89184371, 710896, 11360), rollout=Fit(188853118, 6958, 0)),
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
    model = config.model.model_config()  # a preset with its width or depth changed gets `default`'s costs
    learner = model_costs(model, learner_precision)
    worker = model_costs(model, _precision(config.model.precision, worker_gpu))
    n_worker = max(1, r.scenarios_per_rollout_batch)
    rollouts = max(config.eval.num_rollouts, getattr(stage, "num_rollouts", 0))  # every stage is evaluated
    agent_rollouts = max(ROLLOUT_FIT_FROM, n_worker * rollouts * SIM_AGENTS)
    out = {"rollout_worker": with_margin(worker.rollout.bytes(agent_rollouts, n_worker * MAP_SEGMENTS), worker_gpu)}
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
