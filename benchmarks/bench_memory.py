"""Peak memory of a learner's BC step, CAT-K step and MPO update, and of a rollout worker, at
womd_gpu's settings on the largest real WOMD scenes, against scenes per learner (issue 27).

    nice -n 5 python benchmarks/bench_memory.py                 # the default preset, ~10-20 min on 2 cores
    python benchmarks/bench_memory.py --preset cpu --vocab 1024 --fit-only --precision float32

Settings (pipelines/womd_gpu.yaml): the `default` preset (SMART-tiny, 5.5M parameters), vocabulary
2048, bfloat16 autocast (what a GPU learner runs), AdamW; BC with label smoothing 0.1, CAT-K SFT with
K = 32, MPO with top-48 sampling, per-agent rewards and log pi_ref sent by the rollout workers (k3).
Scenes: the real WOMD scenes of ../shared/womd/real with the most agents (CAT-K, MPO, rollouts: sim
agents, at most 128; BC: every agent with a token, at most 64; map segments within 150 m, at most
2048), printed at the start. Batches of n scenes are the n largest, so every row holds the largest.

Each point runs in a fresh subprocess that reads its scenes, notes its resident memory (VmRSS), then
builds the model(s) and optimiser and runs one step; its peak is the high-water mark (VmHWM) minus
that baseline: weights, gradients, AdamW state, activations and every temporary. glibc is told to
serve every block of 64 KB or more by mmap (MALLOC_MMAP_THRESHOLD_=65536), so a freed tensor leaves
the resident set at once and the high-water mark follows live tensors, as CUDA's allocated bytes do.

Why the CPU figure stands for the GPU's: the step holds the same tensors on either device (the same
parameters, the same activations saved for backward, the same dtypes under bfloat16 autocast; the
model's attention is plain einsum, not a fused kernel that saves less on a GPU). What differs on a
GPU: the CUDA context and library handles (cuBLAS workspaces), outside torch's allocator, and the
caching allocator's reserve and fragmentation above the live bytes; on the CPU, oneDNN scratch
space and the interpreter. `smart_r1.distributed.memory_estimate.gpu_bytes` adds the stated margin
for them (20% and 1 GiB) and the tables compare that with a 24 GB card (22 GiB usable) and an 80 GB
card (79 GiB usable).

Rows: BC and CAT-K against batch_scenarios; the MPO update against scenes per learner, each scene
with --mpo-rollouts rollouts (default 1) in one chunk (`rollouts_per_backward`), once as the code
runs it (one backward per chunk) and once as before issue 27 (every scene in one graph, one
backward; --before-max scenes at most, memory permitting). With backward per chunk, womd_gpu's 32
rollouts in chunks of c hold c rollouts' activations at a time: its peak is the c-rollout point's
(the other chunks add time, not memory); the table's estimates for whole 32-rollout scenes and
other chunk sizes come from the fitted per-unit costs. Points whose predicted peak exceeds half of
this machine's available memory are skipped and said so.

Per-unit costs: for each kind a least-squares fit of peak = fixed + agent x (agent slots) + segment
x (map-segment slots) over its points (slots: padded, times rollouts for MPO and rollout workers);
extra points with fewer map segments separate the two. The fit is printed as the line that
`smart_r1/distributed/memory_estimate.py` records. The last line is `mpo_peak_ratio R`: the MPO
update's peak at the most scenes per learner measured (at least 8) over its peak at one scene.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import glob
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smart_r1.distributed.memory_estimate import (  # noqa: E402
    BC_AGENTS, CARDS, MAP_SEGMENTS, SIM_AGENTS, UnitCosts, gpu_bytes, with_margin,
)

REAL = Path(__file__).resolve().parents[2] / "shared" / "womd" / "real"
GiB = 2 ** 30


# -- one point, in its own process ------------------------------------------------------------

def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _experience_batch(scenes, records, rollouts: int, seed: int):
    """MPO experience of each scene: `rollouts` copies of its logged future (tokens and poses; what
    is held depends on shapes only), per-agent rewards, log pi_old and log pi_ref as sent."""
    import torch
    from smart_r1.rl.experience import collate_experiences
    from smart_r1.tokens.motion_vocab import NUM_FUTURE_TOKENS, NUM_HISTORY_TOKENS, SHIFT
    from smart_r1.types import Experience

    rng = np.random.default_rng(seed)
    first = NUM_HISTORY_TOKENS * SHIFT + 1
    out = []
    for i, (scene, record) in enumerate(zip(scenes, records)):
        a = scene.agent_mask.shape[1]
        tokens = scene.tokens[0, :, NUM_HISTORY_TOKENS:NUM_HISTORY_TOKENS + NUM_FUTURE_TOKENS].numpy()  # [A, 16]
        poses = scene.log_pose[0, :, first:].numpy()  # [A, 80, 3]
        lp = np.full((rollouts, a, NUM_FUTURE_TOKENS), -2.0, np.float32)
        out.append(Experience(
            scenario_index=i, scenario_id=record.scenario_id, version=0, scene=scene,
            tokens=np.repeat(tokens[None], rollouts, 0), poses=np.repeat(poses[None], rollouts, 0),
            log_probs=lp, rewards=rng.uniform(0, 1, (rollouts, a)).astype(np.float32),
            realism=np.zeros(rollouts, np.float32), collision=np.zeros((rollouts, a), bool),
            offroad=np.zeros((rollouts, a), bool), seconds={}, ref_log_probs=lp.copy()))
    del torch
    return collate_experiences(out)


def _one_graph_update(model, optimizer, batch, stage) -> None:
    """The MPO update as it was before issue 27: every scene's loss added into one graph, one backward."""
    from smart_r1.rl.mpo import mpo_loss
    from smart_r1.rl.optim import optimizer_step
    from smart_r1.rollout.closed_loop import token_log_probs

    count = batch.live.sum().clamp_min(1).float()
    model.eval()
    loss = 0.0
    for part in batch.per_scene():
        b, r = part.tokens.shape[:2]
        flat = lambda x: x.reshape(b * r, *x.shape[2:])  # noqa: E731
        lp = token_log_probs(model, part.scenes, part.tokens, part.poses, **dataclasses.asdict(stage.sampling))
        part_loss, _ = mpo_loss(flat(lp), flat(part.ref_log_probs), flat(part.rewards), flat(part.live),
                                stage.alpha, stage.beta, count=count)
        loss = loss + part_loss
    optimizer_step(model, optimizer, loss, stage.grad_clip)


def run_point(point: dict, data_dir: str) -> dict:
    """Peak bytes above the baseline of one step (`point['kind']`), in this process."""
    import torch
    from smart_r1.config import MPOStage, SamplingConfig
    from smart_r1.model import precision
    from smart_r1.model.config import ModelConfig
    from smart_r1.model.smart_tiny import SmartTiny
    from smart_r1.rl.bc import bc_loss
    from smart_r1.rl.catk import catk_sft_loss
    from smart_r1.rl.experience import make_experience, reference_log_probs
    from smart_r1.rl.mpo import mpo_step
    from smart_r1.rl.optim import optimizer_step
    from smart_r1.rl.rewards import RewardConfig
    from smart_r1.rollout.closed_loop import closed_loop
    from smart_r1.rollout.sampling import Sampler
    from smart_r1.tokens.scene import collate

    torch.set_num_threads(point["threads"])
    torch.manual_seed(0)
    precision.set_precision(point["precision"])
    with open(Path(data_dir) / "data.pkl", "rb") as f:
        data = pickle.load(f)
    scenes = data[point["set"]][:point["scenes"]]
    records = data["records_" + point["set"].split("_")[0]][:point["scenes"]]
    vocab = data["vocab"]
    sampling = SamplingConfig(top_k=48)
    batch = (_experience_batch(scenes, records, point["rollouts"], 0) if point["kind"] in ("mpo", "mpo_one_graph")
             else collate(scenes))
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here
    start = time.perf_counter()
    model = SmartTiny(ModelConfig.preset(point["preset"], vocab_size=vocab.size), vocab)
    kind = point["kind"]
    if kind == "rollout":  # a rollout worker: the policy and the frozen reference, no gradient
        reference = copy.deepcopy(model).requires_grad_(False).eval()
        model.eval()
        with torch.no_grad():
            tensors = closed_loop(model, batch, point["rollouts"],
                                  Sampler(**dataclasses.asdict(sampling), generator=torch.Generator().manual_seed(0)))
            ref = reference_log_probs(reference, batch, tensors, sampling)
        make_experience(0, records[0], batch, tensors, 0, RewardConfig(), ref_log_probs=ref)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        if kind == "bc":
            model.train()
            loss, _ = bc_loss(model, batch, label_smoothing=0.1)
            optimizer_step(model, optimizer, loss, 1.0)
        elif kind == "catk":
            model.train()
            loss, _ = catk_sft_loss(model, batch, catk_k=32)
            optimizer_step(model, optimizer, loss, 1.0)
        else:
            stage = MPOStage(name="rft", lr=1e-5, alpha=0.5, beta=0.04, num_rollouts=point["rollouts"],
                             rollouts_per_backward=point["rollouts"], sampling=sampling)
            if kind == "mpo":
                mpo_step(model, None, optimizer, batch, stage, policy_version=0)
            else:
                _one_graph_update(model, optimizer, batch, stage)
    return {"peak": _status("VmHWM") - base, "seconds": time.perf_counter() - start}


# -- the driver ----------------------------------------------------------------------------------

def prepare(data_dir: Path, preset: str, vocab_size: int, per_kind: int) -> dict:
    """Pick the largest real scenes, build a vocabulary from all of them, tokenise, save."""
    from smart_r1.data.womd import read_scenarios
    from smart_r1.tokens.motion_vocab import SHIFT, build_vocab
    from smart_r1.tokens.scene import build_scene, scene_size

    paths = sorted(glob.glob(str(REAL / "*.tfrecord")))
    if not paths:
        raise SystemExit(f"no real WOMD scenes in {REAL}")
    records = [next(read_scenarios(p)) for p in paths]
    now = 2 * SHIFT
    # at most 128 sim agents: a rollout worker keeps 128 (build_scene), and WOSAC scores every sim agent
    sim = sorted((r for r in records if int(r.valid[:, now].sum()) <= SIM_AGENTS),
                 key=lambda r: -int(r.valid[:, now].sum()))[:per_kind]
    with_token = lambda r: int((r.valid[:, ::SHIFT][:, :-1] & r.valid[:, ::SHIFT][:, 1:]).any(1).sum())  # noqa: E731
    candidates = sorted(records, key=lambda r: -min(64, with_token(r)))[:3 * per_kind]
    vocab = build_vocab(records, size=vocab_size, seed=0)
    bc_all = [build_scene(r, vocab, agents="all", max_agents=64) for r in candidates]
    order = sorted(range(len(candidates)), key=lambda i: tuple(-x for x in scene_size(bc_all[i])))[:per_kind]
    data = {"vocab": vocab,
            "sim": [build_scene(r, vocab, agents="sim", max_agents=128) for r in sim], "records_sim": sim,
            "bc": [bc_all[i] for i in order], "records_bc": [candidates[i] for i in order]}
    # the largest scene again with fewer map segments: separates the per-segment cost from the per-agent one
    data["sim_fewmap"] = [build_scene(sim[0], vocab, agents="sim", max_agents=128, max_map_segments=256)]
    data["bc_fewmap"] = [build_scene(data["records_bc"][0], vocab, agents="all", max_agents=64, max_map_segments=256)]
    with open(data_dir / "data.pkl", "wb") as f:
        pickle.dump(data, f)
    return data


def sizes(data: dict, point: dict) -> tuple[int, int]:
    """(agent units, segment units) a point's peak is fitted on: padded slots of the batch (BC,
    CAT-K), of the largest part (MPO: one scene's chunk), of one scene's rollouts (worker)."""
    from smart_r1.tokens.scene import scene_size

    shapes = [scene_size(s) for s in data[point["set"]][:point["scenes"]]]
    if point["kind"] in ("bc", "catk"):
        n = len(shapes)
        return n * max(a for a, _ in shapes), n * max(m for _, m in shapes)
    if point["kind"] == "mpo_one_graph":  # every scene's graph at once, each on its own slots
        return point["rollouts"] * sum(a for a, _ in shapes), sum(m for _, m in shapes)
    a, m = max(shapes)  # MPO per chunk, rollout worker: the largest scene's
    return point["rollouts"] * a, m


def measure(point: dict, data_dir: Path, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--point", json.dumps(point), "--data", str(data_dir)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"point {point} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit(rows: list[dict]) -> tuple[float, float, float]:
    """Least squares of peak = fixed + agent * agent_units + segment * segment_units."""
    x = np.array([[1.0, r["agent_units"], r["segment_units"]] for r in rows])
    y = np.array([float(r["peak"]) for r in rows])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return tuple(float(c) for c in coef)


def gb(n: float) -> str:
    return f"{n / GiB:7.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--precision", default="bfloat16", help="bfloat16 (a GPU's) or float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scenes", default="1,2,4,8", help="scenes per learner (batch_scenarios for BC / CAT-K)")
    parser.add_argument("--mpo-rollouts", type=int, default=1, help="rollouts per scene and chunk in the MPO rows")
    parser.add_argument("--before-max", type=int, default=8, help="most scenes of the one-graph MPO rows")
    parser.add_argument("--fit-only", action="store_true", help="only the points the per-unit fit needs")
    parser.add_argument("--kinds", default="bc,catk,mpo",
                        help="which of bc, catk, mpo, rollout (a rollout worker: 16 and 32 rollouts, slow) to measure")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(run_point(json.loads(args.point), args.data)))
        return

    import torch

    counts = [int(c) for c in args.scenes.split(",")]
    t_start = time.perf_counter()
    print(f"# bench_memory: preset {args.preset}, vocabulary {args.vocab}, {args.precision}, {args.threads} threads; "
          f"torch {torch.__version__}; {platform_name()}")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}
    common = {"preset": args.preset, "precision": args.precision, "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        data = prepare(data_dir, args.preset, args.vocab, max(counts))
        from smart_r1.tokens.scene import scene_size
        for name in ("sim", "bc"):
            print(f"# {name} scenes (agents, map segments): " + ", ".join(
                f"{r.scenario_id} {scene_size(s)}" for s, r in zip(data[name], data['records_' + name])))
        r = args.mpo_rollouts
        # the worker's reference pass takes 512 agent-rollouts (4 rollouts of a 128-agent scene) at a
        # time; from 16 rollouts of 128 agents on, the closed loop's memory is the larger
        plan = [("bc", "bc_fewmap", 1, 1), ("catk", "sim_fewmap", 1, 1), ("mpo", "sim_fewmap", 1, r),
                ("mpo", "sim", 1, 2 * r), ("rollout", "sim_fewmap", 1, 16), ("rollout", "sim", 1, 16),
                ("rollout", "sim", 1, 32)]
        curves = [("bc", "bc", n, 1) for n in counts] + [("catk", "sim", n, 1) for n in counts] \
            + [("mpo", "sim", n, r) for n in counts] \
            + [("mpo_one_graph", "sim", n, r) for n in counts if n <= args.before_max]
        if args.fit_only:
            curves = [c for c in curves if c[2] <= 2 and c[0] != "mpo_one_graph"]
        kinds = set(args.kinds.split(","))
        plan, curves = ([c for c in cs if c[0] in kinds or (c[0] == "mpo_one_graph" and "mpo" in kinds)]
                        for cs in (plan, curves))
        rows = []
        for kind, name, n, rollouts in plan + curves:
            point = {**common, "kind": kind, "set": name, "scenes": n, "rollouts": rollouts}
            units = sizes(data, point)
            row = {"kind": kind, "set": name, "scenes": n, "rollouts": rollouts,
                   "agent_units": units[0], "segment_units": units[1]}
            predicted = predict(rows, row)
            available = _meminfo("MemAvailable")
            if predicted is not None and predicted > 0.5 * available:
                print(f"# skipped {kind} x{n} ({name}, {rollouts} rollouts): predicted {predicted / GiB:.1f} GiB, "
                      f"{available / GiB:.1f} GiB available")
                continue
            row.update(measure(point, data_dir, env))
            rows.append(row)
            print(f"# {kind:13s} {name:10s} scenes {n} rollouts {rollouts:2d} units ({units[0]}, {units[1]}): "
                  f"peak {row['peak'] / GiB:.2f} GiB in {row['seconds']:.0f} s", flush=True)
    report(rows, args, counts)
    print(f"# {time.perf_counter() - t_start:.0f} s in all")
    mpo = {row["scenes"]: row["peak"] for row in rows if row["kind"] == "mpo" and row["set"] == "sim"}
    before = {row["scenes"]: row["peak"] for row in rows if row["kind"] == "mpo_one_graph"}
    if before and max(before) > 1:
        print(f"one-graph (before issue 27) peak ratio at {max(before)} scenes: {before[max(before)] / before[1]:.2f}")
    if mpo and max(mpo) > 1:
        print(f"mpo_peak_ratio {mpo[max(mpo)] / mpo[1]:.3f}")


def platform_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            flags = Path("/proc/cpuinfo").read_text()
            return line.split(":", 1)[1].strip() + (" (AVX512-BF16)" if "avx512_bf16" in flags else " (no AVX512-BF16)")
    return platform.processor()


def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def predict(rows: list[dict], row: dict) -> float | None:
    """A guard's guess of a point's peak: the same kind's largest point scaled by agent units."""
    same = [r for r in rows if r["kind"] == row["kind"]]
    if not same:
        return None
    ref = max(same, key=lambda r: r["agent_units"])
    return ref["peak"] * row["agent_units"] / max(1, ref["agent_units"])


def report(rows: list[dict], args, counts: list[int]) -> None:
    """Per-unit fits, then the tables per scenes per learner with what fits 24 GB and 80 GB cards."""
    costs = {}
    print("\n## per-unit costs (least squares of peak = fixed + agent x agent units + segment x segment units)")
    for kind in ("bc", "catk", "mpo", "rollout"):
        pts = [r for r in rows if r["kind"] == kind]
        if len(pts) >= 3:
            costs[kind] = fit(pts)
            f, a, s = costs[kind]
            worst = max(abs(r["peak"] - (f + a * r["agent_units"] + s * r["segment_units"])) / r["peak"] for r in pts)
            print(f"{kind:8s} fixed {f / 2**20:8.1f} MiB  agent {a / 2**20:7.3f} MiB  segment {s / 2**10:7.1f} KiB"
                  f"  ({len(pts)} points, worst residual {100 * worst:.0f}%)")
    if len(costs) == 4:
        unit = UnitCosts.from_fits(args.preset, args.vocab, args.precision, costs)
        print(f"memory_estimate line: {unit.as_source()}")
    else:
        for kind, coef in costs.items():
            print(f"memory_estimate fit: {kind}=Fit({', '.join(str(max(0, round(x))) for x in coef)})")
    cards = "".join(f" | fits {name}" for name in CARDS)
    for kind, title in (("bc", "BC step (batch_scenarios)"), ("catk", "CAT-K SFT step, K 32 (batch_scenarios)"),
                        ("mpo", f"MPO update, {args.mpo_rollouts} rollout(s) per chunk (scenes per learner)"),
                        ("mpo_one_graph", f"MPO update in one graph, before issue 27 ({args.mpo_rollouts} rollout(s) per scene)")):
        pts = {r["scenes"]: r for r in rows if r["kind"] == kind and r["set"] in ("sim", "bc")}
        if not pts:
            continue
        print(f"\n## {title}\n| scenes | peak GiB (CPU) | GPU estimate GiB{cards} |\n|---|---|---{'|---' * len(CARDS)}|")
        for n in counts:
            if n in pts:
                peak, tag = pts[n]["peak"], ""
            elif kind in costs:  # not measured (memory): the fit at the row's slots
                peak, tag = costs_at(costs[kind], *_row_units(rows, kind, n)), " (fit)"
            else:
                continue
            print(f"| {n} | {gb(peak)}{tag} | {gb(gpu_bytes(peak))} | " + " | ".join(
                "yes" if gpu_bytes(peak) <= cap else "no" for cap in CARDS.values()) + " |")
    if not {"bc", "catk", "mpo"} <= set(costs):
        return
    print(f"\n## at womd_gpu's settings, a WOMD scene's worst case ({BC_AGENTS} agents for BC, {SIM_AGENTS} sim "
          f"agents otherwise, {MAP_SEGMENTS} map segments), from the fits\n| work | GPU estimate GiB{cards} |"
          f"\n|---|---{'|---' * len(CARDS)}|")
    work = [(f"BC, batch_scenarios {n}", costs_at(costs["bc"], n * BC_AGENTS, n * MAP_SEGMENTS)) for n in (1, 2, 4, 8, 16)]
    work += [(f"CAT-K SFT, batch_scenarios {n}", costs_at(costs["catk"], n * SIM_AGENTS, n * MAP_SEGMENTS))
             for n in (1, 2, 4, 8)]
    work += [(f"MPO, rollouts_per_backward {c}" + (" (whole scene)" if c == 32 else ""),
              costs_at(costs["mpo"], c * SIM_AGENTS, MAP_SEGMENTS)) for c in (32, 16, 8, 4, 2, 1)]
    for name, peak in work:
        print(f"| {name} | {gb(gpu_bytes(peak))} | " + " | ".join(
            "yes" if gpu_bytes(peak) <= cap else "no" for cap in CARDS.values()) + " |")
    if "rollout" in costs:
        peak = costs_at(costs["rollout"], 32 * SIM_AGENTS, MAP_SEGMENTS)
        print(f"\nrollout worker, 32 rollouts of one scene on a CPU: {gb(with_margin(peak, gpu=False))} GiB "
              f"resident ({args.precision}; margin included)")


def costs_at(coef: tuple[float, float, float], agents: float, segments: float) -> float:
    f, a, s = coef
    return f + a * agents + s * segments


def _row_units(rows, kind, n):
    pts = [r for r in rows if r["kind"] == kind and r["set"] in ("sim", "bc")]
    one = min(pts, key=lambda r: r["scenes"])
    return one["agent_units"] * n / one["scenes"], one["segment_units"] * n / one["scenes"]


if __name__ == "__main__":
    main()
