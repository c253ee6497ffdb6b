"""The `smart-r1` command line. Each subcommand parses its flags here and imports its work lazily,
so that `smart-r1 --help` stays fast (torch, TensorFlow and Ray load only when needed)."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_make_dataset(args: argparse.Namespace) -> int:
    from smart_r1.data.sumo import make_dataset

    summary = make_dataset(args.out, num_scenarios=args.scenarios, seed=args.seed,
                           scenarios_per_file=args.per_file)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from smart_r1.data.preprocess import REPORT_NAME, preprocess

    report = preprocess(args.input, args.out, num_workers=args.workers)
    print(f"{report['scenarios']} scenarios from {report['files']} files "
          f"({report['files_skipped']} already done) in {report['seconds']:.1f} s -> {args.out}")
    if report["bad_records"]:
        print(f"{len(report['bad_records'])} bad records (listed in {args.out}/{REPORT_NAME}):",
              file=sys.stderr)
        for bad in report["bad_records"][:20]:
            print(f"  {bad['file']}: record {bad['record']}: {bad['error']}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smart-r1", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-dataset", help="generate WOMD-format scenarios with Eclipse SUMO")
    p.add_argument("--out", required=True, help="output folder for Scenario TFRecords")
    p.add_argument("--scenarios", type=int, default=100, help="number of scenarios")
    p.add_argument("--seed", type=int, default=0, help="random seed (output is deterministic)")
    p.add_argument("--per-file", type=int, default=50, help="scenarios per TFRecord file")
    p.set_defaults(func=_cmd_make_dataset)

    p = sub.add_parser("preprocess", help="WOMD Scenario TFRecords -> Parquet shards (Ray)")
    p.add_argument("--input", required=True, help="TFRecord file or glob, e.g. 'DIR/*.tfrecord*'")
    p.add_argument("--out", required=True, help="output folder for Parquet shards")
    p.add_argument("--workers", type=int, default=None, help="Ray CPUs to use (default: all)")
    p.set_defaults(func=_cmd_preprocess)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as e:
        print(f"smart-r1 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
