"""The alpha/beta Tune sweep: bad input fails before any trial; a tiny 2 x 1 grid from one shared
SFT checkpoint (the pipeline test's run folder), with the sweep's storage root (trials, Tune's
state, results) in a bucket on moto's S3 server, interrupted (SIGKILL) after its first finished
trial and resumed with Tuner.restore without redoing that trial; best config and MLflow runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from smart_r1.config import RayConfig, load_config
from smart_r1.distributed.resources import autoscaling_max, whole_trials
from smart_r1.distributed.sweep_config import load_sweep_config, trial_config
from smart_r1.distributed.sweep_results import best_row, format_sweep_table, sweep_report, trial_dir
from smart_r1.storage import exists, join, list_names, read_bytes, read_json, read_text, resolve, write_json

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "pipelines" / "sweep_alpha_beta.py"


def _sweep_yaml(tmp_path: Path, tiny_config, **fields) -> Path:
    pipeline = tiny_config(tmp_path / "tiny.yaml", tmp_path / "unused")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"pipeline": str(pipeline), "out_dir": str(tmp_path / "sweep"),
                                    "alpha": [0.5, 0.9], "beta": [0.0, 0.1], **fields}))
    return path


def _main(argv, capsys) -> tuple[int, str]:
    sys.path.insert(0, str(SCRIPT.parent))
    import sweep_alpha_beta

    rc = sweep_alpha_beta.main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--alpha", "0.5,1.2"], "alpha must be [0, 1]"),
    (["--beta", "-0.01"], "beta must be >= 0"),
    (["--sft-checkpoint", "/no/such/sft.pt"], "no such file or run folder"),
])
def test_bad_input_fails_before_any_trial(tmp_path, tiny_config, capsys, args, message):
    config = _sweep_yaml(tmp_path, tiny_config)
    rc, err = _main(["--config", str(config), *args], capsys)
    assert rc == 2 and "invalid sweep" in err and message in err, err
    assert not (tmp_path / "sweep").exists(), "nothing may start before the checks pass"


def test_run_folder_without_finished_sft_is_refused(tmp_path, tiny_config, capsys):
    config = _sweep_yaml(tmp_path, tiny_config)
    (tmp_path / "run" / "sft").mkdir(parents=True)  # started, never finished: no done.json
    rc, err = _main(["--config", str(config), "--sft-checkpoint", str(tmp_path / "run")], capsys)
    assert rc == 2 and "finished 'sft' stage" in err, err


def test_unreachable_tracking_server_fails_before_any_trial(tmp_path, tiny_config, capsys, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    sft = tmp_path / "sft.pt"
    sft.write_bytes(b"")
    rc, err = _main(["--config", str(_sweep_yaml(tmp_path, tiny_config)), "--sft-checkpoint", str(sft)], capsys)
    assert rc == 2 and f"127.0.0.1:{port} is unreachable" in err, err
    assert not (tmp_path / "sweep").exists()


def test_resuming_with_another_space_is_refused(tmp_path, tiny_config, capsys):
    config = _sweep_yaml(tmp_path, tiny_config)
    sweep = load_sweep_config(config)
    from smart_r1.distributed.sweep import _identity

    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps(_identity(sweep, load_config(sweep.pipeline))))
    rc, err = _main(["--config", str(config), "--alpha", "0.6,0.9"], capsys)
    assert rc == 2 and "different search space" in err, err


def test_trial_config_sweeps_only_rft_and_later_stages(tmp_path, tiny_config):
    base = load_config(tiny_config(tmp_path / "tiny.yaml", tmp_path / "run"))
    config = trial_config(base, "rft", 0.6, 0.1, str(tmp_path / "trial"))
    assert [s.name for s in config.stages] == ["rft", "sft_final"]
    assert (config.stage("rft").alpha, config.stage("rft").beta) == (0.6, 0.1)
    assert config.stage("sft_final") == base.stage("sft_final")
    assert base.stage("rft").alpha == 0.77  # the base config is frozen, untouched


def test_concurrency_counts_rollout_actors_and_learners():
    # 1 + 1 CPU per trial on 2 CPUs: one trial at a time, or two trials would each hold a
    # rollout CPU while their learners wait forever
    assert whole_trials(RayConfig(cpus_per_rollout_worker=1, cpus_per_learner=1), {"CPU": 2.0}) == 1
    assert whole_trials(RayConfig(cpus_per_rollout_worker=0.5, cpus_per_learner=0.5), {"CPU": 2.0}) == 2
    gpu = RayConfig(num_rollout_workers=4, cpus_per_rollout_worker=1, use_gpu=True, num_learners=1)
    assert whole_trials(gpu, {"CPU": 64.0, "GPU": 3.0}) == 3  # GPUs limit
    assert whole_trials(gpu, {"CPU": 2.0}) == 1  # an autoscaling cluster's idle head: one at a time


def test_concurrency_of_a_cluster_that_starts_empty_comes_from_its_autoscaling_maximum(tmp_path):
    """On a launcher-made cluster (`ray up cluster/aws.yaml`) the head holds the config as
    ~/ray_bootstrap_config.yaml: the sweep sizes its concurrency from every node type at its
    max_workers, not from the CPU-less head that is all there is when the sweep starts."""
    aws = autoscaling_max(REPO / "cluster" / "aws.yaml")
    assert aws == {"CPU": 0 + 2 * 48 + 16 * 64, "GPU": 2 * 4}  # head, gpu_learner, cpu_rollout
    womd = load_config(REPO / "pipelines" / "womd_gpu.yaml").ray
    assert whole_trials(womd, aws) > 1 == whole_trials(womd, {"CPU": 0.0})
    assert autoscaling_max(tmp_path / "absent.yaml") is None  # a local Ray or KubeRay: the flag


def test_best_config_objective_and_tie_break():
    def row(trial, meta, collision, status="complete"):
        return {"trial_id": trial, "alpha": 0.5, "beta": 0.0, "status": status,
                "metrics": {"metametric": meta, "simulated_collision_rate": collision,
                            "simulated_offroad_rate": 0.1, "min_average_displacement_error": 2.0}}

    rows = [row("a", 0.70001, 0.30), row("b", 0.69999, 0.20), row("c", 0.65, 0.0),
            row("d", 0.9, 0.0, status="stopped after rft")]
    assert best_row(rows)["trial_id"] == "b"  # tie at 4 decimals: fewer collisions wins; d never finished
    assert best_row([row("x", 0.5, 0.5), row("y", 0.6, 0.9)])["trial_id"] == "y"
    assert format_sweep_table(rows).splitlines()[2].endswith("| b |")
    with pytest.raises(RuntimeError, match="no trial"):
        best_row([rows[-1]])


def test_report_gives_each_trial_its_interval_and_its_paired_difference_to_the_best(tmp_path):
    """Three finished trials scored on the same 12 scenarios: b = a + 0.05 realism on every
    scenario (a difference with no spread), c = a with two scenarios' realism swapped (a's mean,
    but the pairing with b now spreads); a stopped trial gets no interval and no difference."""
    rng = np.random.default_rng(0)
    fields = ("metametric", "simulated_collision_rate", "simulated_offroad_rate", "min_average_displacement_error",
              "kinematic_metrics")
    base = [{"scenario_id": f"s{i}", **dict(zip(fields, (0.5 + 0.2 * rng.random(), 0.1 * rng.random(),
                                                           0.1 * rng.random(), 5 + rng.random(), rng.random())))}
            for i in range(12)]
    trials = {"a": base, "b": [{**r, "metametric": r["metametric"] + 0.05} for r in base],
              "c": [{**r, "metametric": base[(i + 1) % 12 if i < 2 else i]["metametric"]} for i, r in enumerate(base)]}
    trials["c"][1]["metametric"] = base[0]["metametric"]  # c: a's realism values with two scenarios swapped
    rows = []
    for trial, records in trials.items():
        folder = trial_dir(str(tmp_path), trial, 0.5, 0.04)
        write_json(join(folder, "sft_final", "scores_sumo_tune.json"), {"dataset": "sumo_tune", "num_rollouts": 4,
                                                                        "failed": [], "records": records})
        means = {f: float(np.mean([r[f] for r in records])) for f in fields}
        rows.append({"trial_id": trial, "alpha": 0.5, "beta": 0.04, "status": "complete", "metrics": means})
    rows.append({"trial_id": "d", "alpha": 0.9, "beta": 0.04, "status": "stopped after rft",
                 "metrics": dict(rows[0]["metrics"])})
    report = sweep_report(rows, str(tmp_path), "sft_final", "sumo_tune", n_boot=500)
    for r in rows[:3]:
        lo, hi = r["metrics"]["metametric_ci95"]
        assert lo < r["metrics"]["metametric"] < hi
    assert "metametric_ci95" not in rows[3]["metrics"]
    trial_table, diff_table = report.split("Paired difference")
    first = [line for line in trial_table.splitlines() if line.startswith("| 0.")][0]
    assert first.endswith("| b |") and "0.04 | 0." in first and "[" in first  # best first, with its interval
    assert "best (alpha=0.5, beta=0.04)" in diff_table
    diffs = {cells[7].strip(): cells for cells in (line.strip("|").split("|") for line in diff_table.splitlines()
                                                   if line.startswith("| 0."))}
    assert diffs["a"][2].strip() == "-0.0500 [-0.050, -0.050] *"  # a - best(b): the same 0.05 on every scenario
    mean, lo, hi = (float(x) for x in diffs["c"][2].replace("[", " ").replace("]", " ").replace(",", " ").split()[:3])
    assert mean == pytest.approx(-0.05, abs=1e-6) and lo < mean < hi  # c's mean is a's; the swap spreads it
    assert set(diffs) == {"a", "c"}
    assert "d" not in diffs


# -- a tiny 2 x 1 sweep, interrupted and resumed ---------------------------------------------

def _finished_trials(out: str) -> list[str]:
    """Trial folders in the bucket whose last stage (rft) is done."""
    trials = join(out, "trials")
    if not exists(trials):
        return []
    return [name for name in list_names(trials) if exists(join(trials, name, "rft", "done.json"))]


def _mtime(uri: str):
    fs, key = resolve(uri)
    return fs.get_file_info(key).mtime


@pytest.mark.slow
def test_tiny_sweep_interrupted_then_resumed(submitted, mlflow_server, moto_s3, tmp_path, tiny_config, monkeypatch):
    from mlflow.tracking import MlflowClient

    shared_run, _ = submitted  # its finished sft is every trial's start (made once, not per trial)
    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in keys.items():  # credentials from the environment, as with a cluster's instance role
        monkeypatch.setenv(k, v)

    # a trial (rollout actor + learner) takes both CPUs: one trial at a time, the second queued
    ray = {"num_rollout_workers": 1, "cpus_per_rollout_worker": 1, "num_learners": 1, "cpus_per_learner": 1}
    pipeline = tiny_config(tmp_path / "tiny.yaml", tmp_path / "unused", ray=ray,
                           eval={"num_rollouts": 2, "max_scenarios": 2})
    raw = yaml.safe_load(pipeline.read_text())
    raw["stages"] = raw["stages"][:3]  # a trial runs rft alone (the later stages: a unit test above)
    raw["stages"][2]["steps"] = 1  # rft
    pipeline.write_text(yaml.safe_dump(raw))
    out = f"s3://smart-r1/sweep-{tmp_path.name}?{moto_s3}"
    config = tmp_path / "sweep.yaml"
    # one trial, then the other: the first run is killed when the first finishes, so the second
    # is left for the second run
    config.write_text(yaml.safe_dump({"pipeline": str(pipeline), "out_dir": out,
                                      "alpha": [0.5, 0.9], "beta": [0.1]}))
    cmd = [sys.executable, str(SCRIPT), "--config", str(config), "--sft-checkpoint", str(shared_run)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, which dies with its process group

    log1 = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 1500
    finished = []
    while time.time() < deadline and not finished and first.poll() is None:
        time.sleep(2)
        finished = _finished_trials(out)
    os.killpg(first.pid, signal.SIGKILL)  # the driver, its Ray and every trial, mid-sweep
    first.wait()
    log1.close()
    assert finished, (tmp_path / "first.log").read_text()[-4000:]
    done_dir = join(out, "trials", finished[0])
    done = finished[0].split("_alpha=")[0]  # the trial id
    stamps = {stage: _mtime(join(done_dir, stage, "model.pt")) for stage in ("rft",)}
    assert not [p for p in tmp_path.rglob("*") if "tune" in p.parts or "trials" in p.parts], \
        "the sweep wrote trial or Tune state outside its storage root"

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    output = second.stdout + second.stderr
    assert "resuming" in output
    if f"trial {done} starts" in output:  # Tune's state in the bucket lags by its sync period
        assert all(f"[sweep] trial {done}: {stage} already finished" in output for stage in stamps), \
            "a finished trial was run again"
    assert {stage: _mtime(join(done_dir, stage, "model.pt")) for stage in stamps} == stamps

    rows = read_json(join(out, "results.json"))
    assert sorted((r["alpha"], r["beta"]) for r in rows) == [(0.5, 0.1), (0.9, 0.1)]
    assert all(r["status"] == "complete" for r in rows), rows
    for r in rows:
        m = r["metrics"]
        assert 0.0 < m["metametric"] < 1.0 and m["min_average_displacement_error"] > 0
        assert 0.0 <= m["simulated_collision_rate"] <= 1.0 and 0.0 <= m["simulated_offroad_rate"] <= 1.0
        assert m["metametric_ci95"][0] <= m["metametric"] <= m["metametric_ci95"][1]  # over its 2 scenarios
    assert "Paired difference of each finished trial to the best" in read_text(join(out, "results.md"))
    # every trial started from the one shared SFT checkpoint, copied into the bucket (a trial on
    # another node could not read this machine's file); none re-ran the earlier stages
    shared = join(out, "base", "shared_sft.pt")
    assert read_bytes(shared) == (shared_run / "sft" / "model.pt").read_bytes()
    assert f"[rft] mpo from {shared}" in output
    trials = list_names(join(out, "trials"))
    assert len(trials) == 2 and all("rft" in list_names(join(out, "trials", t)) and
                                    not {"bc", "sft"} & set(list_names(join(out, "trials", t))) for t in trials)
    assert list_names(join(out, "tune")), "Tune's state is kept in the sweep's storage root"
    best = read_json(join(out, "best.json"))
    assert best["metrics"]["metametric"] == pytest.approx(max(r["metrics"]["metametric"] for r in rows), abs=1e-4)
    assert best["config"]["stages"][0]["alpha"] == best["alpha"]
    assert f"alpha={best['alpha']:.4g}" in second.stdout

    client = MlflowClient(mlflow_server)
    sweep_id = read_text(join(out, "mlflow_run_id")).strip()
    assert client.get_run(sweep_id).info.status == "FINISHED"
    children = client.search_runs([client.get_run(sweep_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{sweep_id}'")
    trial_runs = [c for c in children if c.info.run_name.startswith("trial ")]
    assert "shared stages" not in {c.info.run_name for c in children}  # given, not made
    assert len(trial_runs) == 2  # a resumed trial keeps its run
    for t in trial_runs:
        assert {"alpha", "beta", "config.stages.rft.alpha"} <= set(t.data.params)
        assert t.data.params["config.stages.rft.alpha"] == t.data.params["alpha"]
        assert "sumo_tune_metametric" in t.data.metrics  # trials are scored on the tune set only
    assert client.get_run(sweep_id).data.metrics["best_alpha"] == best["alpha"]
