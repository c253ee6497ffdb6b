"""Ray Tune sweep of alpha and beta over RFT -> SFT, from one shared SFT checkpoint.

    python pipelines/sweep_alpha_beta.py                                   # 3 x 2 grid, embedded SUMO data
    python pipelines/sweep_alpha_beta.py --alpha 0.7,0.8 --beta 0.02,0.04 --set rft.steps=6
    python pipelines/sweep_alpha_beta.py --alpha 0.6,auto,loo --beta 0.04   # fixed, calibrated, leave-one-out
    python pipelines/sweep_alpha_beta.py --sft-checkpoint runs/sft_rft_sft  # reuse a pipeline run's SFT
    ray job submit --working-dir . -- python pipelines/sweep_alpha_beta.py

The search space is in the sweep YAML; `--set SECTION.FIELD=VALUE` overrides the base pipeline
config. A re-run with the same out_dir resumes the sweep (Tuner.restore): finished trials are
kept, unfinished ones continue from their last finished stage. Trials are scored on tune splits
only (real_tune and sumo_tune; the sweep YAML's rank_data): the best (alpha, beta) by realism
meta metric on the first is printed and written to <out_dir>/best.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def alphas(text: str) -> list[float | str]:
    """Comma-separated alpha values: numbers, or the baselines auto and loo (grid search)."""
    return [v.strip() if v.strip() in ("auto", "loo") else float(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(HERE / "sweep_alpha_beta.yaml"), help="sweep YAML")
    p.add_argument("--pipeline-config", default=None, help="base pipeline YAML (replaces the sweep YAML's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a value of the base pipeline config (repeatable)")
    p.add_argument("--alpha", type=alphas, default=None,
                   help="comma-separated alpha values (grid: numbers, auto or loo) or range ends (random)")
    p.add_argument("--beta", type=floats, default=None, help="comma-separated beta values (grid) or range ends")
    p.add_argument("--search", choices=("grid", "random"), default=None)
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--max-concurrent-trials", type=int, default=None, help="0 = as many as the cluster holds")
    p.add_argument("--asha", action="store_true", default=None, help="ASHA early stopping after each stage")
    p.add_argument("--out-dir", default=None, help="the sweep folder (a re-run resumes it)")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's own log lines (Ray Train's and Tune's progress, core warnings, the "
                        "(Actor pid=...) prefixes); by default they go to Ray's log files only")
    p.add_argument("--sft-checkpoint", default="",
                   help="the shared SFT checkpoint: a model.pt or a finished pipeline run folder "
                        "(default: run the stages before RFT once into <out_dir>/base)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE.parent))  # runnable from a checkout without installing
    from smart_r1.config import load_config
    from smart_r1.distributed.sweep import preflight
    from smart_r1.distributed.sweep_config import load_sweep_config

    args = parse_args(argv)
    changes = {"pipeline": args.pipeline_config, "alpha": args.alpha, "beta": args.beta, "search": args.search,
               "num_samples": args.num_samples, "max_concurrent_trials": args.max_concurrent_trials,
               "asha": args.asha, "out_dir": args.out_dir}
    try:  # every check before any cluster work or trial
        sweep = load_sweep_config(args.config, changes)
        base = load_config(sweep.pipeline, args.overrides + (["ray.verbose=true"] if args.verbose else []))
        preflight(sweep, base, args.sft_checkpoint)
    except ValueError as e:
        print(f"sweep_alpha_beta: invalid sweep: {e}", file=sys.stderr)
        return 2
    from smart_r1.ray_runtime import ensure_ray, quiet_libraries
    from smart_r1.distributed.sweep import run_sweep

    # every setting (model.precision included) reaches the trials, their learners and rollout
    # actors in the config they are handed, never through this process's environment
    if not base.ray.verbose:
        quiet_libraries()
    ensure_ray(log_to_driver=True, quiet=not base.ray.verbose)
    rows = run_sweep(sweep, base, args.sft_checkpoint)
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
