"""Training throughput: the reference path against the optimised default, side by side in one
process (issue 18).

    python benchmarks/bench_train.py [--presets cpu,default] [--scenes 16] [--threads 2]
    python benchmarks/bench_train.py --presets cpu --loss-curve 60     # + a short BC loss curve
    python benchmarks/bench_train.py --presets cpu --compile 3         # + torch.compile of the BC step

First the machine's dense matmul rates (float32, bfloat16). Then, on generated SUMO scenes, for
each model preset and each of
    bc       an epoch of BC steps (forward, backward, AdamW) over `--scenes` scenes, batches of 4
    catk     an epoch of CAT-K SFT steps over `--catk-scenes` scenes (CAT-K rollout + update)
    mpo      one MPO update of a realistic RFT batch: 4 scenes x 8 rollouts sampled top-8 by the
             model and scored by the fast WOSAC metrics, as the rollout workers make it
    rollout  32 closed-loop rollouts (top-8 sampling) of the scene with the most sim agents
two paths, each once for counting FLOPs (torch.utils.flop_counter, also the warm-up) and
`--repeats` times timed, alternating:
    reference  float32, eager, as before issue 18: batches padded to the largest scene, every
               key's relative pose projected, gathers by advanced indexing, MPO's reference
               model run by the learner on the padded batch
    optimised  the defaults: precision `auto` (bfloat16 where the processor or GPU has it, else
               float32), factored relative attention and embedding gathers, BC / CAT-K batches
               bucketed by scene size, the MPO update per scene (no padding) with the reference's
               log-probs computed by the rollout workers (their cost is printed apart: it moves
               to the workers, which wait for the learner on 2 cores)
For each: scenes (or agent-steps) per second, counted GFLOP, FLOP utilisation against the
matching matmul rate, and the speedup. The last line is
`speedup_bc X speedup_mpo Y speedup_rollout Z` for the `default` preset (else the last preset).

`--compile N` also measures `torch.compile` (default mode, inductor) of the model for the BC step
at `--compile-preset`, against the same optimised eager model: N epochs of the same batches each,
the first compiled epoch including the compilation (every batch shape compiles once), the later
ones without it; printed with the break-even number of BC steps.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smart_r1.config import MPOStage, SamplingConfig  # noqa: E402
from smart_r1.model import precision  # noqa: E402
from smart_r1.model.config import ModelConfig  # noqa: E402
from smart_r1.model.layers import use_fast_paths  # noqa: E402
from smart_r1.model.smart_tiny import SmartTiny  # noqa: E402
from smart_r1.rl.bc import bc_loss  # noqa: E402
from smart_r1.rl.catk import catk_sft_loss  # noqa: E402
from smart_r1.rl.experience import collate_experiences, make_experience, reference_log_probs  # noqa: E402
from smart_r1.rl.mpo import mpo_step  # noqa: E402
from smart_r1.rl.optim import optimizer_step  # noqa: E402
from smart_r1.rl.rewards import RewardConfig  # noqa: E402
from smart_r1.rollout.closed_loop import closed_loop  # noqa: E402
from smart_r1.rollout.sampling import Sampler  # noqa: E402
from smart_r1.tokens.motion_vocab import build_vocab  # noqa: E402
from smart_r1.tokens.scene import build_scene, collate, scene_size, size_bucketed  # noqa: E402

PATHS = ("reference", "optimised")
SAMPLING = SamplingConfig(top_k=8)


def processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_rate(dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Dense square matmul GFLOP/s on this process's threads (emulated bf16 is slow: smaller n)."""
    n = 1024 if dtype == torch.float32 or precision.cpu_has_bf16() else 256
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - start) / 1e9


class Switches:
    """The switches of one path: precision and the model's fast forms."""

    def __init__(self, name: str):
        self.name = name
        self.precision = "float32" if name == "reference" else precision.get_precision()

    def __enter__(self):
        self._ctx = precision.using(self.precision)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    def dtype(self) -> torch.dtype:
        return precision.compute_dtype("cpu", self.precision)


def epoch_batches(scenes: list, path: str, seed: int) -> list[list]:
    """The epoch's batches of 4: the shuffled order cut in turn (reference) or bucketed by size."""
    order = list(range(len(scenes)))
    rng = random.Random(seed)
    rng.shuffle(order)
    if path == "reference":
        return [[scenes[i] for i in order[k:k + 4]] for k in range(0, len(order), 4)]
    return [[scenes[i] for i in b] for b in size_bucketed(order, 4, lambda i: scene_size(scenes[i]), rng)]


def run_path(work, model, path: str, counted: bool):
    """(seconds, FLOPs or None) of `work(model)` under `path`'s switches."""
    use_fast_paths(model, path == "optimised")
    with Switches(path):
        if counted:
            counter = FlopCounterMode(display=False)
            with counter:
                work(model)
            return None, counter.get_total_flops()
        start = time.perf_counter()
        work(model)
        return time.perf_counter() - start, None


def compare(name: str, works: dict, models: dict, repeats: int, units: float, unit: str, rates: dict) -> dict:
    """Count, then time `works[path](models[path])` alternately; print one row per path."""
    flops, seconds = {}, {p: [] for p in PATHS}
    for p in PATHS:
        flops[p] = run_path(works[p], models[p], p, counted=True)[1]
    for _ in range(repeats):
        for p in PATHS:
            seconds[p].append(run_path(works[p], models[p], p, counted=False)[0])
    use_fast_paths(models["optimised"], True)
    out = {}
    for p in PATHS:
        s = min(seconds[p])  # the run least disturbed by other processes
        dtype = Switches(p).dtype()
        rate = flops[p] / s / 1e9
        out[p] = s
        print(f"  {name:8s} {p:10s} {str(dtype).replace('torch.', ''):9s} {s:8.2f} s {units / s:10.2f} {unit:12s} "
              f"{flops[p] / 1e9:8.1f} GFLOP {rate:7.1f} GFLOP/s {100 * rate / rates[dtype]:5.1f}% of matmul", flush=True)
    speedup = out["reference"] / out["optimised"]
    print(f"  {name:8s} speedup {speedup:.2f}", flush=True)
    return {"seconds": out, "flops": flops, "speedup": speedup}


def bc_work(scenes: list, path: str, seed: int):
    def work(model):
        model.train()
        optimizer = model._bench_optimizer
        for batch in epoch_batches(scenes, path, seed):
            loss, _ = bc_loss(model, collate(batch))
            optimizer_step(model, optimizer, loss, 1.0)
    return work


def catk_work(scenes: list, path: str, seed: int):
    def work(model):
        model.train()
        for batch in epoch_batches(scenes, path, seed):
            loss, _ = catk_sft_loss(model, collate(batch), catk_k=5)
            optimizer_step(model, model._bench_optimizer, loss, 1.0)
    return work


def rft_batch(model: SmartTiny, records: list, scenes: list, rollouts: int) -> tuple:
    """4 scenes' experiences as rollout workers make them (the model's top-8 samples, fast WOSAC
    rewards, and the reference's log-probs), and the seconds those reference passes took."""
    experiences, ref_seconds = [], 0.0
    generator = torch.Generator().manual_seed(0)
    for i, (record, scene) in enumerate(zip(records, scenes)):
        tensors = closed_loop(model, scene, rollouts, Sampler(**dataclasses.asdict(SAMPLING), generator=generator))
        start = time.perf_counter()
        ref = reference_log_probs(model, scene, tensors, SAMPLING)  # the reference = the starting policy
        ref_seconds += time.perf_counter() - start
        experiences.append(make_experience(i, record, scene, tensors, 0, RewardConfig(), ref_log_probs=ref))
    return collate_experiences(experiences), ref_seconds


def mpo_work(batch, ref_model, path: str):
    stage = MPOStage(name="rft", lr=1e-5, alpha=0.6, beta=0.04, sampling=SAMPLING)
    if path == "reference":  # the learner runs the reference on the padded batch, as before
        batch = dataclasses.replace(batch, ref_log_probs=None)

    def work(model):
        use_fast_paths(ref_model, path == "optimised")
        mpo_step(model, ref_model, model._bench_optimizer, batch, stage, policy_version=0,
                 per_scene=path == "optimised")
    return work


def rollout_work(scene, rollouts: int):
    def work(model):
        closed_loop(model, scene, rollouts, Sampler(**dataclasses.asdict(SAMPLING),
                                                    generator=torch.Generator().manual_seed(0)))
    return work


def fresh_models(cfg: ModelConfig, vocab, lr: float = 1e-4) -> dict:
    torch.manual_seed(0)
    base = SmartTiny(cfg, vocab)
    models = {p: copy.deepcopy(base) for p in PATHS}
    for m in models.values():
        m._bench_optimizer = torch.optim.AdamW(m.parameters(), lr=lr)
    return models


def loss_curve(records: list, vocab, preset: str, steps: int, paths: dict) -> None:
    """Short BC runs from the same initial weights: the loss per step of each path (same scenes,
    each path's own batching), printed as a table of 10-step means."""
    scenes = [build_scene(r, vocab, agents="all", max_agents=64) for r in records]
    curves = {}
    for label, (path, name) in paths.items():
        model = fresh_models(ModelConfig.preset(preset, vocab_size=vocab.size), vocab, lr=1e-3)[path]
        use_fast_paths(model, path == "optimised")
        losses, epoch = [], 0
        with precision.using(name):
            while len(losses) < steps:
                for batch in epoch_batches(scenes, path, seed=epoch):
                    loss, _ = bc_loss(model, collate(batch))
                    optimizer_step(model, model._bench_optimizer, loss, 1.0)
                    losses.append(float(loss.detach()))
                    if len(losses) == steps:
                        break
                epoch += 1
        curves[label] = losses
        print(f"  loss curve {label}: {len(losses)} steps done", flush=True)
    labels = list(curves)
    print("  steps     " + "  ".join(f"{label:>22s}" for label in labels))
    for k in range(0, steps, 10):
        print(f"  {k + 1:3d}-{min(k + 10, steps):3d}   " + "  ".join(
            f"{statistics.mean(curves[label][k:k + 10]):22.4f}" for label in labels))


def compile_bc(scenes: list, cfg: ModelConfig, vocab, epochs: int) -> dict:
    """Seconds per BC epoch (the same batches every epoch) of the optimised eager model and of
    `torch.compile` of it, from the same weights; the compiled model's first epoch compiles."""
    import torch._dynamo

    models = fresh_models(cfg, vocab)
    eager, compiled = models["reference"], models["optimised"]  # two copies of the same weights
    use_fast_paths(eager, True)
    use_fast_paths(compiled, True)
    torch._dynamo.reset()
    compiled_forward = torch.compile(compiled)

    def epoch(model, forward) -> float:
        model.train()
        start = time.perf_counter()
        for batch in epoch_batches(scenes, "optimised", 0):
            loss, _ = bc_loss(forward, collate(batch))
            optimizer_step(model, model._bench_optimizer, loss, 1.0)
        return time.perf_counter() - start

    times = {"eager": [], "compiled": []}
    with Switches("optimised"):
        for _ in range(epochs):  # alternating, as `compare`
            times["eager"].append(epoch(eager, eager))
            times["compiled"].append(epoch(compiled, compiled_forward))
    steps = len(epoch_batches(scenes, "optimised", 0))
    eager_s = min(times["eager"][1:] or times["eager"])  # the first eager epoch warms up too
    compiled_s = min(times["compiled"][1:]) if epochs > 1 else float("nan")
    compile_s = times["compiled"][0] - compiled_s
    print("  compile  eager epochs    " + " ".join(f"{t:7.2f}" for t in times["eager"]) + f" s ({steps} steps each)")
    print("  compile  compiled epochs " + " ".join(f"{t:7.2f}" for t in times["compiled"]) + " s (the first compiles)")
    saved = (eager_s - compiled_s) / steps
    breakeven = f"{compile_s / saved:.0f} BC steps" if saved > 0 else "never (the compiled step is not faster)"
    print(f"  compile  per step: eager {eager_s / steps:.3f} s, compiled {compiled_s / steps:.3f} s "
          f"(speedup {eager_s / compiled_s:.2f} excluding compilation); compilation {compile_s:.1f} s; "
          f"first compiled epoch / eager epoch {times['compiled'][0] / eager_s:.2f}; pays after {breakeven}",
          flush=True)
    return {"eager_s": eager_s, "compiled_s": compiled_s, "compile_s": compile_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="cpu,default", help="model presets, comma-separated")
    p.add_argument("--scenes", type=int, default=16, help="scenes of the BC epoch (batches of 4)")
    p.add_argument("--catk-scenes", type=int, default=8, help="scenes of the CAT-K SFT epoch")
    p.add_argument("--rollouts", type=int, default=8, help="rollouts per scene of the RFT batch (4 scenes)")
    p.add_argument("--closed-loop-rollouts", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs per path, alternating (the fastest is shown: on a shared machine the least disturbed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--data", default="", help="a folder of scenarios; default: generate --scenes SUMO scenes")
    p.add_argument("--loss-curve", type=int, default=0,
                   help="also run this many BC steps per path (first preset, on every scene of the data)")
    p.add_argument("--loss-curve-bf16", action="store_true", help="the loss curve also with bfloat16 forced")
    p.add_argument("--compile", type=int, default=0,
                   help="also time N BC epochs of torch.compile(model) against eager (0: skip; N >= 2)")
    p.add_argument("--compile-preset", default="cpu")
    args = p.parse_args()

    from smart_r1.data.dataset import iter_scenarios
    from smart_r1.data.sumo import make_dataset

    torch.set_num_threads(args.threads)
    print(f"processor: {processor()}; native bf16: cpu {precision.cpu_has_bf16()}; torch {torch.__version__}, "
          f"{args.threads} threads; precision {precision.get_precision()} -> "
          f"{str(precision.compute_dtype('cpu')).replace('torch.', '')}", flush=True)
    rates = {torch.float32: matmul_rate(torch.float32), torch.bfloat16: matmul_rate(torch.bfloat16)}
    print(f"matmul float32 {rates[torch.float32]:.1f} GFLOP/s, bfloat16 {rates[torch.bfloat16]:.1f} GFLOP/s", flush=True)

    data = args.data
    if not data:
        data = tempfile.mkdtemp(prefix="bench_train_")
        start = time.perf_counter()
        make_dataset(data, num_scenarios=args.scenes, seed=0)
        print(f"{args.scenes} SUMO scenes generated in {time.perf_counter() - start:.0f} s", flush=True)
    records = list(iter_scenarios(data))
    vocab = build_vocab(records, size=args.vocab_size, seed=0)
    bc_scenes = [build_scene(r, vocab, agents="all", max_agents=64) for r in records[:args.scenes]]
    sim = [(r, build_scene(r, vocab, agents="sim")) for r in records if r.sim_agent_mask.any()]
    catk_scenes = [s for _, s in sim[:args.catk_scenes]]
    rft = sim[:4]
    biggest = max(sim, key=lambda rs: rs[1].agent_mask.shape[1])[1]
    print(f"BC scenes: agents {[scene_size(s)[0] for s in bc_scenes]}, map segments "
          f"{[scene_size(s)[1] for s in bc_scenes]}", flush=True)

    results = {}
    presets = [name for name in args.presets.split(",") if name]  # "": only --compile / --loss-curve
    for preset in presets:
        cfg = ModelConfig.preset(preset, vocab_size=args.vocab_size)
        print(f"\n[{preset}] {SmartTiny(cfg, vocab).num_parameters():,} parameters", flush=True)
        res = results[preset] = {}
        models = fresh_models(cfg, vocab)
        res["bc"] = compare("bc", {q: bc_work(bc_scenes, q, 0) for q in PATHS}, models, args.repeats,
                            len(bc_scenes), "scenes/s", rates)
        models = fresh_models(cfg, vocab)
        res["catk"] = compare("catk", {q: catk_work(catk_scenes, q, 0) for q in PATHS}, models, args.repeats,
                              len(catk_scenes), "scenes/s", rates)
        models = fresh_models(cfg, vocab)
        with precision.using(precision.get_precision()):
            batch, ref_seconds = rft_batch(models["optimised"].eval(), [r for r, _ in rft], [s for _, s in rft],
                                           args.rollouts)
        ref_model = copy.deepcopy(models["reference"]).requires_grad_(False)
        res["mpo"] = compare("mpo", {q: mpo_work(batch, ref_model, q) for q in PATHS}, models, args.repeats,
                             batch.tokens.shape[0], "scenes/s", rates)
        print(f"  mpo      the rollout workers' reference passes for this batch: {ref_seconds:.2f} s "
              f"(moved off the learner)", flush=True)
        models = fresh_models(cfg, vocab)
        agent_steps = args.closed_loop_rollouts * int(biggest.sim_mask.sum()) * 80
        res["rollout"] = compare("rollout", {q: rollout_work(biggest, args.closed_loop_rollouts) for q in PATHS},
                                 models, args.repeats, agent_steps, "agent-steps/s", rates)

    if args.loss_curve:
        preset = presets[0] if presets else args.compile_preset
        print(f"\n[{preset}] BC loss curve, {args.loss_curve} steps of 4 scenes, lr 1e-3, same initial weights", flush=True)
        paths = {"reference float32": ("reference", "float32"),
                 f"optimised {precision.get_precision()}": ("optimised", precision.get_precision())}
        if args.loss_curve_bf16:
            paths["optimised bfloat16"] = ("optimised", "bfloat16")
        loss_curve(records, vocab, preset, args.loss_curve, paths)

    if args.compile:
        print(f"\n[{args.compile_preset}] torch.compile of the BC step (optimised path), {args.compile} epochs of "
              f"{len(bc_scenes)} scenes", flush=True)
        compile_bc(bc_scenes, ModelConfig.preset(args.compile_preset, vocab_size=args.vocab_size), vocab,
                   args.compile)

    if not results:
        return
    last = "default" if "default" in results else list(results)[-1]
    r = results[last]
    print(f"\nspeedups on the {last} preset")
    print(f"speedup_bc {r['bc']['speedup']:.2f} speedup_mpo {r['mpo']['speedup']:.2f} "
          f"speedup_rollout {r['rollout']['speedup']:.2f}")


if __name__ == "__main__":
    main()
