"""A run folder never mixes results of two configs: a changed stage is refused with the keys that
differ, redone with `restart`, or redone in a branch; unchanged stages are kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from smart_r1.config import load_config
from smart_r1.distributed.run_identity import INIT, branch, check_run, record_stage, stage_fingerprint

TINY = Path(__file__).resolve().parents[2] / "pipelines" / "tiny.yaml"


def _finished_run(tmp_path: Path, overrides=()):
    """A run folder as the pipeline leaves it (every stage recorded, with a file in its folder)."""
    config = load_config(TINY, [f"out_dir={tmp_path / 'run'}", *overrides])
    out = Path(config.out_dir)
    out.mkdir()
    (out / "init.pt").write_text("init")
    record_stage(config, INIT)
    for stage in config.stages:
        (out / stage.name).mkdir()
        (out / stage.name / "model.pt").write_text(stage.name)
        record_stage(config, stage.name)
    return config, out


def test_unchanged_or_resource_only_changes_resume(tmp_path):
    config, _ = _finished_run(tmp_path)
    check_run(config)
    check_run(load_config(TINY, [f"out_dir={config.out_dir}", "ray.cpus_per_learner=1", "ray.learner_threads=2"]))


def test_resizing_after_bc_keeps_bc(tmp_path):
    """More learners and rollout actors (and GPUs, and another checkpoint cadence) after BC: no
    recorded stage is refused or redone, not even with --restart."""
    config, out = _finished_run(tmp_path)
    (out / "sft").rename(out / "sft_unfinished")  # BC done; the rest to come
    resized = load_config(TINY, [f"out_dir={out}", "ray.num_learners=2", "ray.num_rollout_workers=3",
                                 "ray.use_gpu=true", "ray.cpus_per_rollout_worker=2", "rft.checkpoint_every=1"])
    assert stage_fingerprint(resized, "bc") == stage_fingerprint(config, "bc")
    check_run(resized)
    check_run(resized, restart=True)
    assert (out / "bc" / "model.pt").read_text() == "bc" and (out / "init.pt").exists()


def test_records_made_with_resource_keys_still_resume(tmp_path):
    """A run.json written before resources left the fingerprint (its inputs hold `ray`, its
    fingerprints hash them) resumes after any resize, and a real change is still refused, naming
    only that key."""
    import json

    from smart_r1.distributed.run_identity import RUN_FILE, fingerprint

    config, out = _finished_run(tmp_path)
    record = json.loads((out / RUN_FILE).read_text())
    for name, stage in record["stages"].items():
        if name != INIT:
            stage["inputs"]["ray"] = {"num_rollout_workers": 1, "num_learners": 1, "use_gpu": False}
            stage["fingerprint"] = fingerprint(stage["inputs"])
    (out / RUN_FILE).write_text(json.dumps(record))
    check_run(load_config(TINY, [f"out_dir={out}", "ray.num_learners=2", "ray.num_rollout_workers=4"]))
    with pytest.raises(ValueError, match=r"stage 'rft' was made with different stages\.rft\.beta\. Re-run"):
        check_run(load_config(TINY, [f"out_dir={out}", "ray.num_learners=2", "rft.beta=0.1"]))


def test_naming_more_evaluation_sets_keeps_every_stage(tmp_path):
    """Which sets score the stages is no input of a stage (a re-run scores finished stages on a set
    named later), also for records that hold it; how each set is scored is one."""
    import json

    from smart_r1.distributed.run_identity import RUN_FILE, fingerprint

    config, out = _finished_run(tmp_path, ["eval.datasets=sumo_heldout"])
    more = load_config(TINY, [f"out_dir={out}", "eval.datasets=sumo_heldout,sumo_tune"])
    assert stage_fingerprint(more, "rft") == stage_fingerprint(config, "rft")
    record = json.loads((out / RUN_FILE).read_text())
    for name, stage in record["stages"].items():
        if "eval" in stage["inputs"]:  # as written before the rule
            stage["inputs"]["eval"]["datasets"] = "sumo_heldout"
            stage["fingerprint"] = fingerprint(stage["inputs"])
    (out / RUN_FILE).write_text(json.dumps(record))
    check_run(more)
    with pytest.raises(ValueError, match=r"stage 'bc' was made with different eval\.max_scenarios"):
        check_run(load_config(TINY, [f"out_dir={out}", "eval.max_scenarios=5"]))


def test_a_changed_stage_is_refused_naming_the_keys(tmp_path):
    config, out = _finished_run(tmp_path)
    changed = load_config(TINY, [f"out_dir={out}", "rft.alpha=0.5", "rft.beta=0.1"])
    with pytest.raises(ValueError, match=r"stage 'rft' was made with different stages\.rft\.alpha, stages\.rft\.beta"):
        check_run(changed)
    assert stage_fingerprint(changed, "sft") == stage_fingerprint(config, "sft")
    with pytest.raises(ValueError, match=r"stage 'init' was made with different model\.preset"):
        check_run(load_config(TINY, [f"out_dir={out}", "model.preset=cpu"]))


def test_an_option_added_later_at_its_default_keeps_earlier_runs(tmp_path):
    """A run recorded before `token_noise_top_k` existed (its BC inputs lack the key) resumes with
    the option at its default (1) and is refused with it set."""
    import json

    config, out = _finished_run(tmp_path, ["bc.token_noise_top_k=1"])
    record = json.loads((out / "run.json").read_text())
    for name in record["stages"]:
        for stage in record["stages"][name]["inputs"].get("stages", {}).values():
            assert "token_noise_top_k" not in stage  # at its default: not part of the inputs
    check_run(config)
    for name in record["stages"]:  # some versions wrote later options out at their defaults
        for stage in record["stages"][name]["inputs"].get("stages", {}).values():
            stage.update(token_noise_top_k=1, train_data="train")
    (out / "run.json").write_text(json.dumps(record))
    check_run(config)
    noisy = load_config(TINY, [f"out_dir={out}", "bc.token_noise_top_k=3"])
    with pytest.raises(ValueError, match=r"stage 'bc' was made with different stages\.bc\.token_noise_top_k"):
        check_run(noisy)


def test_model_size_overrides_enter_the_fingerprint_only_when_set(tmp_path):
    """model.dim and model.agent_blocks came after runs existed: at 0 (the preset's) a run made
    before them resumes; set, every stage is refused (the model changed)."""
    import json

    config, out = _finished_run(tmp_path)
    record = json.loads((out / "run.json").read_text())
    assert all("dim" not in r["inputs"]["model"] for r in record["stages"].values())
    for r in record["stages"].values():  # as a version that wrote them out at their defaults would
        r["inputs"]["model"].update(dim=0, agent_blocks=0)
    (out / "run.json").write_text(json.dumps(record))
    check_run(config)
    wider = load_config(TINY, [f"out_dir={out}", "model.dim=64"])
    with pytest.raises(ValueError, match=r"model\.dim"):
        check_run(wider)


def test_restart_redoes_the_changed_stage_and_those_after_it(tmp_path):
    _, out = _finished_run(tmp_path)
    changed = load_config(TINY, [f"out_dir={out}", "rft.alpha=0.5"])
    check_run(changed, restart=True)
    assert (out / "bc" / "model.pt").exists() and (out / "sft" / "model.pt").exists()
    assert not (out / "rft").exists() and not (out / "sft_final").exists()
    check_run(changed)  # nothing recorded is inconsistent any more


def test_branch_keeps_the_old_run_and_redoes_in_a_new_folder(tmp_path):
    config, out = _finished_run(tmp_path)
    (out / "mlflow_run_id").write_text("old-run")
    changed = load_config(TINY, [f"out_dir={out}", "sft_final.lr=1e-5"])
    branched = branch(changed, str(tmp_path / "branch"))
    new = Path(branched.out_dir)
    assert (new / "rft" / "model.pt").read_text() == "rft" and not (new / "sft_final").exists()
    assert not (new / "mlflow_run_id").exists(), "a branch is a new MLflow run"
    assert (out / "sft_final" / "model.pt").exists(), "the old run is untouched"
    check_run(config)
    with pytest.raises(ValueError, match="already exists"):
        branch(changed, str(new))
