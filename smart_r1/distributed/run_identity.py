"""A run folder's identity: which config made what it holds (the folder is the run's storage root,
a local folder or a URI, read and written through `smart_r1.storage`).

What a stage produces depends on the data, the model, the seed, the starting checkpoint, the
evaluation (its metrics), and the stages up to and including it. The hash of those is the stage's
fingerprint, recorded in `<out_dir>/run.json` with those inputs when the stage starts (the
initial model is the pseudo-stage "init"). A re-run whose inputs of a recorded stage differ is
refused, naming the keys that differ, unless asked to start over from the first differing stage
(`restart`), or to branch into a new folder (`branch`: the matching stages are copied, the rest is
redone there).

Resource settings are not part of it: the whole `ray` section (rollout workers, learners, GPUs,
CPUs, threads, storage) and how often a stage saves its state (`checkpoint_every`). A run resized
after days of BC (more learners, fewer rollout actors) keeps its BC. The learners' data split and
the rollout actors' sampling streams change with them, as any resumed stage's draws do; the
method, its data and its seeds do not. Records written before this rule (their inputs hold
`ray.num_rollout_workers`, `ray.num_learners`, `ray.use_gpu`) are compared without those keys.

Nor is the choice of evaluation sets (`eval.datasets`): a stage's model does not depend on it, and
a re-run that names a set a finished stage was not scored on scores it there (how many scenarios,
rollouts and how they are sampled stay in: they change the recorded figures).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from smart_r1 import storage
from smart_r1.config import MODEL_SIZES, PipelineConfig

RUN_FILE = "run.json"
INIT = "init"
# Stage options added after run folders existed, with their defaults: one at its default enters no
# fingerprint, so a code upgrade does not make every earlier run redo its stages (a crashed WOMD
# run resumed by a newer version keeps its BC). Add each new stage option here with its default.
LATER_OPTIONS = {"token_noise_top_k": 1, "train_data": "train", "progress_weight": 0.0, "gate_by_progress": False,
                 "progress_both_ways": False}
LATER_MODEL_OPTIONS = {name: 0 for name in MODEL_SIZES}  # the same for the model section's
# Stage options that change how a stage runs, not what it makes (how often it saves, how much of a
# batch is held at once: the same gradient): never part of a fingerprint.
RUN_OPTIONS = ("checkpoint_every", "rollouts_per_backward", "memory_budget_gb")


def _flat(d, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def stage_inputs(config: PipelineConfig, upto: int) -> dict:
    """What decides the results of stage `upto` (-1: the initial model), as plain values."""
    full = config.to_dict()
    common = {"data": full["data"], "model": _model_options(full["model"]), "seed": config.seed,
              "init_checkpoint": config.init_checkpoint}
    if upto < 0:
        return common
    stages = [_method_options(s) for s in full["stages"][: upto + 1]]
    return {**common, "eval": _scored_alike(full["eval"]), "stages": {s["name"]: s for s in stages}}


def _scored_alike(evaluation: dict) -> dict:
    """The evaluation settings that change a recorded figure (not which sets are scored)."""
    return {k: v for k, v in evaluation.items() if k != "datasets"}


def _set_options(options: dict, later: dict) -> dict:
    """`options` without those of `later` that are at their defaults."""
    return {k: v for k, v in options.items() if k not in later or v != later[k]}


def _model_options(model: dict) -> dict:
    """The model section without the later options at their defaults."""
    return _set_options(model, LATER_MODEL_OPTIONS)


def _method_options(stage: dict) -> dict:
    """A stage's options that decide what it makes: no run option, no later option at its default."""
    return _set_options({k: v for k, v in stage.items() if k not in RUN_OPTIONS}, LATER_OPTIONS)


def comparable(inputs: dict) -> dict:
    """Recorded inputs as `stage_inputs` makes them now: records of earlier versions held the
    resource keys (`ray`), the evaluation sets, run options and later options at their defaults
    (written out by some versions); all are dropped."""
    stages = {name: _method_options(s) for name, s in inputs.get("stages", {}).items()}
    kept = {k: v for k, v in inputs.items() if k != "ray"}
    if "model" in inputs:
        kept["model"] = _model_options(inputs["model"])
    if "eval" in inputs:
        kept["eval"] = _scored_alike(inputs["eval"])
    return {**kept, **({"stages": stages} if "stages" in inputs else {})}


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]


def stage_fingerprint(config: PipelineConfig, name: str) -> str:
    index = -1 if name == INIT else [s.name for s in config.stages].index(name)
    return fingerprint(stage_inputs(config, index))


def _recorded(out: str) -> dict:
    return storage.read_json(storage.join(out, RUN_FILE), {"stages": {}})["stages"]


def _differences(recorded: dict, current: dict) -> list[str]:
    old, new = _flat(recorded), _flat(current)
    return sorted(k for k in old.keys() | new.keys() if old.get(k, "<absent>") != new.get(k, "<absent>"))


def _order(config: PipelineConfig) -> list[tuple[str, int]]:
    return [(INIT, -1)] + [(s.name, i) for i, s in enumerate(config.stages)]


def check_run(config: PipelineConfig, restart: bool = False) -> None:
    """Refuse (ValueError) a re-run of `config.out_dir` whose recorded stages were made with other
    inputs; with `restart`, remove the first differing stage and everything after it instead."""
    out = config.out_dir
    recorded = _recorded(out)
    for name, index in _order(config):
        if name not in recorded:
            continue
        current, made_with = stage_inputs(config, index), comparable(recorded[name]["inputs"])
        if fingerprint(made_with) == fingerprint(current):
            continue
        keys = _differences(made_with, current)
        if not restart:
            raise ValueError(
                f"{storage.display(out)} holds results of another config: stage {name!r} was made with different "
                f"{', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}. Re-run with --restart to redo it and "
                f"the stages after it there, --branch NEW_DIR to keep this run and redo them in a new "
                f"folder, or pick another --out-dir")
        _forget_from(config, out, name)
        print(f"[run] --restart: stage {name!r} and the stages after it are redone ({', '.join(keys[:5])} changed)",
              flush=True)
        return


def _forget_from(config: PipelineConfig, out: str, first: str) -> None:
    """Remove stage `first` and every later stage's results from the run folder and its record
    (generated data is checked on its own: `prepare_data` remakes a set of another size or seed)."""
    names = [n for n, _ in _order(config)]
    later = names[names.index(first):]
    recorded = _recorded(out)
    for name in later:
        recorded.pop(name, None)
        if name == INIT:
            storage.remove(storage.join(out, "init.pt"))
        else:
            storage.remove_tree(storage.join(out, name))
    storage.write_json(storage.join(out, RUN_FILE), {"stages": recorded})


def record_stage(config: PipelineConfig, name: str) -> str:
    """Record that stage `name` of `config.out_dir` is (being) made with this config's inputs;
    returns its fingerprint."""
    out = config.out_dir
    index = -1 if name == INIT else [s.name for s in config.stages].index(name)
    inputs = stage_inputs(config, index)
    recorded = _recorded(out)
    recorded[name] = {"fingerprint": fingerprint(inputs), "inputs": inputs}
    storage.write_json(storage.join(out, RUN_FILE), {"stages": recorded})
    return recorded[name]["fingerprint"]


def branch(config: PipelineConfig, new_dir: str) -> PipelineConfig:
    """Copy the run folder to `new_dir` (which must not exist; either may be a local folder or a
    URI), then forget there what `config` would redo; returns the config pointed at the new folder.
    The MLflow run and Ray Train's state are not copied: the branch is a new run."""
    old, new = config.out_dir, new_dir
    if storage.exists(new):
        raise ValueError(f"--branch: {storage.display(new)} already exists; give a new folder")
    if storage.exists(old):
        storage.copy_tree(old, new, skip=("mlflow_run_id", "ray"))
    config = dataclasses.replace(config, out_dir=str(new))
    check_run(config, restart=True)
    return config
