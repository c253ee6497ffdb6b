"""The `smart-r1` command line. Each subcommand imports its work lazily, so that `smart-r1 --help`
stays fast (torch, TensorFlow and Ray load only when needed). Flags that set a config are made
from the config's fields and help texts (`smart_r1.config.add_config_flags`), so they never
disagree with the code; those light dataclasses are the only work imported up front.
"""

from __future__ import annotations

import argparse
import json
import sys

from smart_r1.config import BCConfig, EvaluateConfig, SamplingConfig, add_config_flags, config_from_flags


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


def _cmd_build_vocab(args: argparse.Namespace) -> int:
    from smart_r1.data.dataset import iter_scenarios
    from smart_r1.tokens.motion_vocab import build_vocab

    vocab = build_vocab(iter_scenarios(args.data, args.max_scenarios), size=args.size, seed=args.seed)
    vocab.save(args.out)
    print(f"motion vocabulary: {vocab.size} tokens per type -> {args.out}")
    return 0


def _cmd_model_info(args: argparse.Namespace) -> int:
    import torch

    from smart_r1.model.config import ModelConfig
    from smart_r1.model.smart_tiny import SmartTiny
    from smart_r1.tokens.motion_vocab import NUM_TYPES, SHIFT, MotionVocab

    cfg = ModelConfig.preset(args.preset)
    model = SmartTiny(cfg, MotionVocab(torch.zeros(NUM_TYPES, cfg.vocab_size, SHIFT, 3)))
    print(json.dumps({"preset": args.preset, "parameters": model.num_parameters(), "config": cfg.to_dict()}, indent=2))
    return 0


def _cmd_train_bc(args: argparse.Namespace) -> int:
    from smart_r1.model.config import ModelConfig
    from smart_r1.rl.bc import train_bc
    from smart_r1.tokens.motion_vocab import MotionVocab

    cfg = config_from_flags(BCConfig, args)
    vocab = MotionVocab.load(args.vocab) if args.vocab else None
    model_cfg = ModelConfig.preset(args.preset, vocab_size=vocab.size) if vocab else ModelConfig.preset(args.preset)
    summary = train_bc(args.data, args.out, model_cfg, cfg, vocab)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_rollout(args: argparse.Namespace) -> int:
    from smart_r1.data.dataset import iter_scenarios
    from smart_r1.metrics.rollouts_io import states_to_scenario_rollouts
    from smart_r1.rollout.policy import load_policy, sample_states
    from smart_r1.storage import write_bytes

    model = load_policy(args.checkpoint)
    record = next(iter_scenarios(args.scenario), None)
    if record is None:
        raise ValueError(f"no scenario in {args.scenario}")
    sampling = config_from_flags(SamplingConfig, args)
    sampling.validate()
    states = sample_states(model, record, args.num_rollouts, args.seed, sampling)
    proto = states_to_scenario_rollouts(record, states)
    write_bytes(args.out, proto.SerializeToString())
    print(f"{states.shape[0]} rollouts of {states.shape[1]} sim agents "
          f"(scenario {record.scenario_id}) -> {args.out}")
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from smart_r1.data.womd import read_scenarios
    from smart_r1.evaluation.submission import read_rollouts
    from smart_r1.metrics import step_events
    from smart_r1.metrics.rollouts_io import scenario_rollouts_to_states
    from smart_r1.viz.render import render_scenario

    records = {r.scenario_id: r for r in read_scenarios(args.scenario)}
    if not records:
        raise ValueError(f"{args.scenario} holds no scenario")
    if args.rollouts is None:
        record, states = next(iter(records.values())), None
    else:
        rollouts = read_rollouts(args.rollouts)
        match = [r for r in rollouts if r.scenario_id in records]
        if not match:
            raise ValueError(f"{args.rollouts} has rollouts for scenarios "
                             f"{sorted({r.scenario_id for r in rollouts})[:5]}, none of which is in "
                             f"{args.scenario} ({sorted(records)[:5]})")
        record = records[match[0].scenario_id]
        states = scenario_rollouts_to_states(record, match[0])
    if states is not None and not 0 <= args.rollout_index < len(states):
        raise ValueError(f"rollout index {args.rollout_index} out of range: there are {len(states)} rollouts")
    events = step_events(record, states[args.rollout_index]) if states is not None else None
    path = render_scenario(record, states, args.out, rollout_index=args.rollout_index, events=events,
                           frame_stride=args.frame_stride)
    print(f"scenario {record.scenario_id} -> {path}")
    return 0


def _cmd_metrics(args: argparse.Namespace) -> int:
    from smart_r1.data.womd import read_scenarios
    from smart_r1.metrics import METRIC_FIELDS, compute_scenario_metrics, scenario_rollouts_to_states
    from smart_r1.metrics.rollouts_io import read_rollouts

    records = list(read_scenarios(args.scenario))
    if args.scenario_id:
        records = [r for r in records if r.scenario_id == args.scenario_id]
    if len(records) != 1:
        raise ValueError(f"{args.scenario} holds {len(records)} matching scenarios; pick one with --scenario-id")
    record = records[0]
    rollouts = read_rollouts(args.rollouts, record.scenario_id)
    if args.official:
        from smart_r1.data.womd import read_scenario_protos
        from smart_r1.metrics.official import official_scenario_metrics

        # The original proto, not one rebuilt from the record: the official code sees the file as is.
        proto = next(p for p in read_scenario_protos(args.scenario) if p.scenario_id == record.scenario_id)
        metrics = official_scenario_metrics(proto, rollouts)
    else:
        metrics = compute_scenario_metrics(record, scenario_rollouts_to_states(record, rollouts))
    if args.json:
        print(json.dumps({"scenario_id": record.scenario_id, **metrics}, indent=2))
    else:
        print(f"scenario_id {record.scenario_id} ({'official evaluator' if args.official else 'smart_r1.metrics'})")
        for name in METRIC_FIELDS:
            print(f"{name:40s} {metrics[name]:.6f}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from smart_r1.evaluation.evaluate import evaluate

    result, renders = evaluate(config_from_flags(EvaluateConfig, args))
    print(result.leaderboard.format_table())
    print(f"{result.evaluator} evaluator, {result.seconds:.1f} s"
          + (f"; results -> {args.out}" if args.out else "")
          + (f"; renders -> {renders[0].parent}" if renders else ""))
    return 0


def _cmd_export_submission(args: argparse.Namespace) -> int:
    from smart_r1.evaluation.evaluate import export_submission
    from smart_r1.evaluation.submission import SubmissionInfo

    info = SubmissionInfo(account_name=args.account_name, unique_method_name=args.method_name,
                          authors=tuple(args.authors), affiliation=args.affiliation,
                          description=args.description, method_link=args.method_link,
                          num_model_parameters=args.num_model_parameters)
    archive = export_submission(args.checkpoint, args.data, args.out, info, seed=args.seed,
                                max_scenarios=args.max_scenarios, sampling=config_from_flags(SamplingConfig, args))
    print(f"submission -> {archive} (upload it on the WOSAC 2025 challenge page)")
    return 0


def _cmd_compare_runs(args: argparse.Namespace) -> int:
    from smart_r1.metrics.intervals import compare_runs
    from smart_r1.storage import write_text

    report = compare_runs(args.runs, args.data, args.against or ())
    print(report, end="")
    if args.out:
        write_text(args.out, report)
        print(f"-> {args.out}")
    return 0


def _cmd_preflight(args: argparse.Namespace) -> int:
    from smart_r1.config import load_config
    from smart_r1.distributed.preflight import run_preflight
    from smart_r1.ray_runtime import ensure_ray, quiet_libraries

    overrides = list(args.overrides) + ([f"out_dir={args.out_dir}"] if args.out_dir else [])
    config = load_config(args.config, overrides)  # an invalid config: exit status 2, before any Ray work
    if not args.verbose:
        quiet_libraries()
    ensure_ray(log_to_driver=args.verbose, quiet=not args.verbose)
    return run_preflight(config, args.timeout_s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smart-r1", description="SMART-tiny traffic simulation: WOMD data, tokens, model, rollouts, WOSAC metrics.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-dataset", help="generate WOMD-format scenarios with Eclipse SUMO")
    p.add_argument("--out", required=True, help="output folder for Scenario TFRecords")
    p.add_argument("--scenarios", type=int, default=100, help="number of scenarios")
    p.add_argument("--seed", type=int, default=0, help="random seed (output is deterministic)")
    p.add_argument("--per-file", type=int, default=50, help="scenarios per TFRecord file")
    p.set_defaults(func=_cmd_make_dataset)

    p = sub.add_parser("preprocess", help="WOMD Scenario TFRecords -> Parquet shards (Ray)")
    p.add_argument("--input", required=True, help="TFRecord file, folder or glob, local or a bucket URI, e.g. 'DIR/*.tfrecord*' or 's3://bucket/womd/training.tfrecord-*'")
    p.add_argument("--out", required=True, help="output folder for Parquet shards: a local folder or a URI "
                   "(file:///abs/dir, s3://bucket/prefix, gs://bucket/prefix; written through pyarrow.fs)")
    p.add_argument("--workers", type=int, default=None, help="Ray CPUs to use (default: all)")
    p.set_defaults(func=_cmd_preprocess)

    p = sub.add_parser("build-vocab", help="cluster a motion-token vocabulary (K-disks per agent type)")
    p.add_argument("--data", required=True, help="Parquet folder, TFRecord folder or TFRecord glob")
    p.add_argument("--out", required=True, help="output vocabulary file (.pt)")
    p.add_argument("--size", type=int, default=2048, help="tokens per agent type")
    p.add_argument("--max-scenarios", type=int, default=None, help="use at most this many scenarios")
    p.add_argument("--seed", type=int, default=0, help="clustering seed")
    p.set_defaults(func=_cmd_build_vocab)

    p = sub.add_parser("model-info", help="print the SMART-tiny config and parameter count")
    p.add_argument("--preset", default="default", help="model preset: default (~7M, GPU), cpu, test")
    p.set_defaults(func=_cmd_model_info)

    p = sub.add_parser("train", help="train a stage")
    stages = p.add_subparsers(dest="stage", required=True)
    b = stages.add_parser("bc", help="behaviour cloning: teacher-forced next-token prediction")
    b.add_argument("--data", required=True, help="Parquet folder, TFRecord folder or TFRecord glob")
    b.add_argument("--out", required=True, help="output checkpoint (.pt)")
    b.add_argument("--preset", default="default", help="model preset: default (~7M, GPU), cpu (~0.6M), test")
    b.add_argument("--vocab", default=None, help="motion vocabulary from build-vocab (default: built from the data)")
    add_config_flags(b, BCConfig)
    b.set_defaults(func=_cmd_train_bc)

    p = sub.add_parser("rollout", help="closed-loop rollouts of one scenario -> ScenarioRollouts proto")
    p.add_argument("--checkpoint", required=True, help="SMART-tiny checkpoint")
    p.add_argument("--scenario", required=True, help="Scenario TFRecord (its first scenario is simulated)")
    p.add_argument("--num-rollouts", type=int, default=32, help="joint rollouts")
    p.add_argument("--out", required=True, help="output ScenarioRollouts .binproto")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_config_flags(p, SamplingConfig)
    p.set_defaults(func=_cmd_rollout)

    p = sub.add_parser("render", help="draw a scenario and a rollout to a PNG or an animated GIF")
    p.add_argument("--scenario", required=True, help="Scenario TFRecord")
    p.add_argument("--rollouts", default=None,
                   help="ScenarioRollouts / SimAgentsChallengeSubmission binproto or submission "
                        "tar.gz (default: show the log)")
    p.add_argument("--out", required=True, help="output FILE.png (still) or FILE.gif (animation)")
    p.add_argument("--rollout-index", type=int, default=0, help="which joint scene to draw")
    p.add_argument("--frame-stride", type=int, default=2, help="steps between GIF frames")
    p.set_defaults(func=_cmd_render)

    p = sub.add_parser("evaluate", help="roll out and score every scenario; the WOSAC leaderboard table")
    add_config_flags(p, EvaluateConfig, required=("data",))
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export-submission", help="32 rollouts per scenario -> WOSAC 2025 submission tar.gz")
    p.add_argument("--checkpoint", required=True, help="SMART-tiny checkpoint")
    p.add_argument("--data", required=True, help="Parquet folder or TFRecord file / glob (the test split)")
    p.add_argument("--out", required=True, help="empty output folder for the shards and submission.tar.gz")
    p.add_argument("--account-name", required=True, help="Waymo Open Dataset account e-mail")
    p.add_argument("--method-name", required=True, help="method name shown on the leaderboard")
    p.add_argument("--authors", nargs="*", default=[], help="author names")
    p.add_argument("--affiliation", default="", help="affiliation")
    p.add_argument("--description", default="", help="short method description")
    p.add_argument("--method-link", default="", help="paper or code URL")
    p.add_argument("--num-model-parameters", default="", help="e.g. 7M (default: counted from the model)")
    p.add_argument("--max-scenarios", type=int, default=None, help="export only the first N scenarios")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_config_flags(p, SamplingConfig)
    p.set_defaults(func=_cmd_export_submission)
    p = sub.add_parser("metrics", help="WOSAC 2025 sim-agents metrics of rollouts (fast PyTorch or official)")
    p.add_argument("--scenario", required=True, help="Scenario TFRecord file")
    p.add_argument("--rollouts", required=True, help="ScenarioRollouts or SimAgentsChallengeSubmission binproto")
    p.add_argument("--scenario-id", default=None, help="which scenario of the file (default: the only one)")
    p.add_argument("--official", action="store_true", help="use Waymo's official evaluator (slow)")
    p.add_argument("--json", action="store_true", help="print JSON with the SimAgentMetrics field names")
    p.set_defaults(func=_cmd_metrics)

    p = sub.add_parser("preflight", help="check a pipeline config against the cluster it will run on (drivers, "
                                         "devices, all-reduce, storage, data, MLflow, precision, memory) before the run")
    p.add_argument("--config", required=True, help="the pipeline YAML the run will use")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config value, as the run will (repeatable)")
    p.add_argument("--out-dir", default=None, help="the run's storage root, as the run's --out-dir")
    p.add_argument("--timeout-s", type=float, default=600.0,
                   help="longest wait for the learners and rollout actors to be placed (an autoscaler may "
                        "have to start their nodes) and for the learners' all-reduce")
    p.add_argument("--verbose", action="store_true", help="also show Ray's own log lines")
    p.set_defaults(func=_cmd_preflight)

    p = sub.add_parser("compare-runs", help="stage table over pipeline runs that differ by seed, "
                                            "with t-intervals over seeds and independent units (scenes, networks)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="pipeline out_dir of each seed's run: a folder or a bucket URI")
    p.add_argument("--data", default=None, help="evaluation set (real_report, heldout, sumo_heldout, real_tune, "
                                                "sumo_tune); default: the first of these the runs were scored on")
    p.add_argument("--against", nargs="+", metavar="BASE_DIR", default=None,
                   help="baseline runs of another configuration, one per RUN_DIR in the same seed order: adds "
                        "each stage's paired difference (runs - baseline)")
    p.add_argument("--out", default=None, help="also write the report to this markdown file")
    p.set_defaults(func=_cmd_compare_runs)
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
