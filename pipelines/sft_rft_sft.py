"""SFT-RFT-SFT: BC -> closed-loop SFT (CAT-K) -> RFT (MPO) -> closed-loop SFT, on Ray.

    python pipelines/sft_rft_sft.py                       # embedded SUMO data, tiny CPU preset
    python pipelines/sft_rft_sft.py --config pipelines/womd_gpu.yaml --set data.train=/data/womd/train
    ray job submit --working-dir . -- python pipelines/sft_rft_sft.py

Stages and hyper-parameters come from the YAML config; `--set SECTION.FIELD=VALUE` overrides any
of them (e.g. `--set rft.alpha=0.8 --set rft.beta=0.02`). A re-run with the same out_dir resumes;
one whose config changed a finished stage's inputs is refused unless --restart or --branch says
what to do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(HERE / "sft_rft_sft.yaml"), help="pipeline YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--out-dir", default=None,
                   help="the run's storage root, a local folder or a bucket URI (s3://..., gs://...): every "
                        "stage keeps its checkpoint, logs and tables there, and a re-run resumes from it")
    p.add_argument("--init-checkpoint", default=None, help="start from this checkpoint (skips BC)")
    p.add_argument("--restart", action="store_true",
                   help="out_dir holds stages made with another config: redo them (and the stages after them)")
    p.add_argument("--branch", default=None, metavar="NEW_DIR",
                   help="copy out_dir to NEW_DIR and run there, redoing the stages whose config changed")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's own log lines (Ray Train's worker groups, checkpoints and reports, "
                        "core warnings, the (Actor pid=...) prefixes); by default they go to Ray's log files only "
                        "(same as --set ray.verbose=true)")
    p.add_argument("--inject-learner-failure", action="append", default=[], metavar="STAGE:N",
                   help="fault drill: make the learner fail once at epoch/step N of STAGE "
                        "(it must resume from its last checkpoint)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE.parent))  # runnable from a checkout without installing
    from smart_r1.config import load_config
    from smart_r1.distributed.run_identity import branch, check_run

    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.out_dir:
        overrides.append(f"out_dir={args.out_dir}")
    if args.init_checkpoint:
        overrides.append(f"init_checkpoint={args.init_checkpoint}")
    if args.verbose:
        overrides.append("ray.verbose=true")
    try:
        config = load_config(args.config, overrides)  # every check before any cluster work
        failures = {}
        for item in args.inject_learner_failure:
            stage, _, n = item.partition(":")
            config.stage(stage)  # an unknown stage name fails here
            failures[stage] = int(n)
        if args.branch:
            config = branch(config, args.branch)
        check_run(config, restart=args.restart)  # refuses to mix results of another config
    except ValueError as e:
        print(f"sft_rft_sft: invalid configuration: {e}", file=sys.stderr)
        return 2
    from smart_r1.distributed.pipeline import run_pipeline
    from smart_r1.ray_runtime import ensure_ray, quiet_libraries

    # every setting (model.precision included) reaches the learners and rollout actors in their
    # stage's spec: a process on another node inherits nothing from this one's environment
    if not config.ray.verbose:
        quiet_libraries()
    ensure_ray(log_to_driver=True, quiet=not config.ray.verbose)
    try:
        run_pipeline(config, fail_once_at=failures)
    except ValueError as e:  # resources that cannot fit, unreadable data: say so, no traceback
        print(f"sft_rft_sft: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
