"""A short BC run's loss curve on the reference path against the optimised default (issue 18,
item 3: "a short BC run's loss curve matches within noise").

    python benchmarks/bc_loss_curve.py [--scenes 32] [--heldout 8] [--epochs 4] [--preset cpu]

One process, one set of generated SUMO scenes, one initial model (the same seed), trained by the
BC stage's recipe (AdamW, lr 1e-3 with the BC stage's warm-up / cosine schedule, gradient clip 1,
batches of 4 scenes, each epoch's order shuffled by `random.Random(seed * 7919 + epoch)` as
`supervised_loop` does) three times:
    reference   use_fast_paths(model, False), float32, the shuffled order cut into batches in turn
                (as before issue 18)
    fast        use_fast_paths(model, True), precision `auto`, the same batches in the same order:
                differs from `reference` only in the forward's arithmetic (and bfloat16 where the
                processor has it), so its per-step difference is the numerics alone
    optimised   the defaults: fast paths, precision `auto`, and the epoch's order bucketed by scene
                size (`size_bucketed`, as `supervised_loop`): the same scenes per epoch in other
                batches, so only per-epoch means compare
`--bf16` adds `fast` with bfloat16 forced (emulated, very slow, on a CPU without native bf16).
Printed: the per-step loss of `reference` and `fast` and their difference, the max absolute
difference, the per-epoch token-weighted loss of every run, and each trained model's loss on
`--heldout` unseen scenes (evaluated in float32 on the reference path, eval mode). Last line:
`max_abs_step_diff X heldout_reference Y heldout_optimised Z`.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smart_r1.model import precision  # noqa: E402
from smart_r1.model.config import ModelConfig  # noqa: E402
from smart_r1.model.layers import use_fast_paths  # noqa: E402
from smart_r1.model.smart_tiny import SmartTiny  # noqa: E402
from smart_r1.rl.bc import bc_loss  # noqa: E402
from smart_r1.rl.optim import optimizer_step, set_learning_rate, warmup_cosine  # noqa: E402
from smart_r1.tokens.scene import build_scene, collate, scene_size, size_bucketed  # noqa: E402

BATCH = 4


def epoch_batches(order: list[int], scenes: list, bucketed: bool, rng: random.Random) -> list[list[int]]:
    """The epoch's batches of indices: `order` cut in turn, or bucketed by size (`supervised_loop`)."""
    if bucketed:
        return list(size_bucketed(order, BATCH, lambda k: scene_size(scenes[k]), rng))
    return [order[k:k + BATCH] for k in range(0, len(order), BATCH)]


def train(scenes: list, cfg: ModelConfig, vocab, fast: bool, precision_name: str, bucketed: bool,
          epochs: int, lr: float, seed: int) -> tuple[SmartTiny, list[dict], float]:
    """One BC run from the seed's initial weights: (model, per-step rows, seconds)."""
    torch.manual_seed(seed)
    model = SmartTiny(cfg, vocab)
    use_fast_paths(model, fast)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)  # the BC stage's
    steps_per_epoch = -(-len(scenes) // BATCH)
    total = epochs * steps_per_epoch
    order = list(range(len(scenes)))
    rows, start = [], time.perf_counter()
    with precision.using(precision_name):
        for epoch in range(epochs):
            rng = random.Random(seed * 7919 + epoch)
            rng.shuffle(order)
            for i, batch in enumerate(epoch_batches(order, scenes, bucketed, rng)):
                set_learning_rate(optimizer, lr * warmup_cosine(epoch * steps_per_epoch + i, total))
                model.train()
                loss, stats = bc_loss(model, collate([scenes[k] for k in batch]))
                grad_norm = optimizer_step(model, optimizer, loss, 1.0)
                rows.append({"epoch": epoch, "loss": stats["loss"], "tokens": stats["tokens"],
                             "grad_norm": grad_norm, "batch": tuple(batch)})
    return model, rows, time.perf_counter() - start


@torch.no_grad()
def heldout_loss(model: SmartTiny, scenes: list) -> float:
    """Token-weighted BC loss on `scenes`, float32, reference path, eval mode."""
    use_fast_paths(model, False)
    model.eval()
    total, tokens = 0.0, 0
    with precision.using("float32"):
        for k in range(0, len(scenes), BATCH):
            _, stats = bc_loss(model, collate(scenes[k:k + BATCH]))
            total += stats["loss"] * stats["tokens"]
            tokens += stats["tokens"]
    use_fast_paths(model, True)
    return total / max(tokens, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenes", type=int, default=32, help="training scenes (generated SUMO)")
    p.add_argument("--heldout", type=int, default=8, help="unseen scenes for the final loss")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default="", help="a folder of scenarios; default: generate them")
    p.add_argument("--bf16", action="store_true", help="also the `fast` run with bfloat16 forced")
    args = p.parse_args()

    from smart_r1.data.dataset import iter_scenarios
    from smart_r1.data.sumo import make_dataset
    from smart_r1.tokens.motion_vocab import build_vocab

    torch.set_num_threads(args.threads)
    auto = str(precision.compute_dtype("cpu", "auto")).replace("torch.", "")
    print(f"torch {torch.__version__}, {args.threads} threads; native bf16 on this cpu: "
          f"{precision.cpu_has_bf16()}; precision auto -> {auto}", flush=True)
    data = args.data
    if not data:
        data = tempfile.mkdtemp(prefix="bc_loss_curve_")
        start = time.perf_counter()
        make_dataset(data, num_scenarios=args.scenes + args.heldout, seed=args.seed)
        print(f"{args.scenes + args.heldout} SUMO scenes generated in {time.perf_counter() - start:.0f} s", flush=True)
    records = list(iter_scenarios(data))
    train_records, heldout_records = records[:args.scenes], records[args.scenes:args.scenes + args.heldout]
    vocab = build_vocab(train_records, size=args.vocab_size, seed=args.seed)
    build = lambda rs: [s for s in (build_scene(r, vocab, agents="all", max_agents=64) for r in rs)
                        if bool(s.agent_mask.any())]
    scenes, heldout = build(train_records), build(heldout_records)
    cfg = ModelConfig.preset(args.preset, vocab_size=args.vocab_size)
    print(f"{len(scenes)} training scenes, {len(heldout)} held out; preset {args.preset} "
          f"(dropout {cfg.dropout}); {args.epochs} epochs of {-(-len(scenes) // BATCH)} steps, lr {args.lr:g}",
          flush=True)

    runs = {"reference": (False, "float32", False), "fast": (True, "auto", False),
            "optimised": (True, "auto", True)}
    if args.bf16:
        runs["fast_bf16"] = (True, "bfloat16", False)
    results = {}
    for name, (fast, prec, bucketed) in runs.items():
        model, rows, seconds = train(scenes, cfg, vocab, fast, prec, bucketed, args.epochs, args.lr, args.seed)
        results[name] = {"rows": rows, "seconds": seconds, "heldout": heldout_loss(model, heldout)}
        print(f"  {name:10s} fast_paths {fast!s:5s} precision {prec:8s} bucketed {bucketed!s:5s} "
              f"{len(rows)} steps in {seconds:6.1f} s ({seconds / len(rows):.2f} s/step)", flush=True)

    ref, fast = results["reference"]["rows"], results["fast"]["rows"]
    assert [r["batch"] for r in ref] == [r["batch"] for r in fast]
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(ref, fast)]
    print("\nper step (same batches): loss reference, loss fast, |difference|")
    for k, (a, b) in enumerate(zip(ref, fast)):
        print(f"  step {k + 1:3d} epoch {a['epoch'] + 1}  {a['loss']:.6f}  {b['loss']:.6f}  {diffs[k]:.2e}")
    rel = max(d / a["loss"] for d, a in zip(diffs, ref))
    print(f"max |difference| {max(diffs):.2e} (relative {rel:.2e}); first step {diffs[0]:.2e}, "
          f"last step {diffs[-1]:.2e}")

    print("\nper epoch (token-weighted mean training loss)")
    print("  epoch " + "".join(f"{name:>12s}" for name in results))
    for epoch in range(args.epochs):
        cells = []
        for name in results:
            rows = [r for r in results[name]["rows"] if r["epoch"] == epoch]
            cells.append(sum(r["loss"] * r["tokens"] for r in rows) / sum(r["tokens"] for r in rows))
        print(f"  {epoch + 1:5d} " + "".join(f"{c:12.4f}" for c in cells))
    print("  held-out loss (float32, reference path, eval): " + ", ".join(
        f"{name} {results[name]['heldout']:.4f}" for name in results))
    print(f"max_abs_step_diff {max(diffs):.2e} heldout_reference {results['reference']['heldout']:.4f} "
          f"heldout_optimised {results['optimised']['heldout']:.4f}")


if __name__ == "__main__":
    main()
