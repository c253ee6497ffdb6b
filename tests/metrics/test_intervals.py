"""Bootstrap intervals on real per-scenario metrics: the matrix aggregate is `aggregate_metrics`,
intervals hold the estimate and shrink with more scenarios, a run paired with itself differs by
exactly 0, the seed-and-scenario scheme, determinism; and `smart-r1 compare-runs` on run folders
made from those records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from smart_r1.metrics import (
    METRIC_FIELDS, aggregate_metrics, bootstrap_ci, compute_metrics_batch, log_replay_states, paired_difference,
    seed_bootstrap,
)
from smart_r1.metrics.leaderboard import with_categories
from smart_r1.metrics.intervals import (
    HEADLINE_FIELDS, crossed_t_interval, draw_counts, headline_intervals, paired_seed_difference, resampled_means,
    scenario_matrix, scores_path, stage_differences, unit_labels,
)

NUM_SCENARIOS = 8


@pytest.fixture(scope="module")
def records(womd_record) -> list[dict]:
    """Per-scenario records as the pipeline's workers return them, from the project's scorer: the
    real WOMD scenario under 8 levels of random-walk noise (2 rollouts each), one per id."""
    rng = np.random.default_rng(0)
    states = []
    for k in range(NUM_SCENARIOS):
        s = log_replay_states(womd_record, 2)
        s[..., :2] += np.cumsum(rng.normal(0, 0.04 * (k + 1), s[..., :2].shape), axis=2)
        states.append(s)
    metrics = compute_metrics_batch([womd_record] * NUM_SCENARIOS, states)
    return [{"scenario_id": f"{womd_record.scenario_id}-{k}", **with_categories(m)} for k, m in enumerate(metrics)]


def _width(ci: tuple[float, float]) -> float:
    return ci[1] - ci[0]


def test_matrix_aggregate_is_aggregate_metrics(records):
    values = scenario_matrix(records, METRIC_FIELDS)  # [n, F]
    plain = resampled_means(values, np.ones((1, len(records))))[0]
    expected = aggregate_metrics(records)
    for j, name in enumerate(METRIC_FIELDS):
        assert plain[j] == pytest.approx(expected[name], rel=1e-12, abs=1e-12), name
    # A resample's counts give the aggregate of the records drawn that many times.
    counts = draw_counts(np.random.default_rng(3), 5, len(records))
    assert (counts.sum(axis=1) == len(records)).all()
    for row, means in zip(counts, resampled_means(values, counts)):
        drawn = [r for r, c in zip(records, row) for _ in range(int(c))]
        expected = aggregate_metrics(drawn)
        assert means == pytest.approx([expected[f] for f in METRIC_FIELDS], rel=1e-12, abs=1e-12)


def test_interval_holds_the_estimate_and_shrinks_with_more_scenarios(records):
    point = aggregate_metrics(records)
    ci = bootstrap_ci(records, HEADLINE_FIELDS)
    varying = [f for f in HEADLINE_FIELDS if len({r[f] for r in records}) > 1]
    assert "metametric" in varying and "min_average_displacement_error" in varying
    for f in HEADLINE_FIELDS:
        lo, hi = ci[f]
        assert lo - 1e-12 <= point[f] <= hi + 1e-12, f
    # Four independent scenes scoring like each scenario: the same mean, an interval about half as
    # wide (1 / sqrt(4)).
    ci4 = bootstrap_ci([{**r, "scenario_id": f"{r['scenario_id']}c{c}"} for c in range(4) for r in records],
                       HEADLINE_FIELDS)
    for f in varying:
        assert _width(ci[f]) > 0
        assert 0.3 * _width(ci[f]) < _width(ci4[f]) < 0.75 * _width(ci[f]), f
    # A higher level is a wider interval.
    assert _width(bootstrap_ci(records, ["metametric"], level=0.99)["metametric"]) > _width(ci["metametric"])


def test_deterministic_by_seed(records):
    assert bootstrap_ci(records, HEADLINE_FIELDS, seed=7) == bootstrap_ci(records, HEADLINE_FIELDS, seed=7)
    assert bootstrap_ci(records, HEADLINE_FIELDS, seed=7) != bootstrap_ci(records, HEADLINE_FIELDS, seed=8)
    assert paired_difference(records, records[::-1], ["metametric"], seed=1) == \
        paired_difference(records, records[::-1], ["metametric"], seed=1)


def test_paired_difference(records):
    # A run against itself, listed in another order: exactly 0, with a [0, 0] interval.
    same = paired_difference(records, records[::-1], HEADLINE_FIELDS)
    for f in HEADLINE_FIELDS:
        assert (same[f].mean, same[f].lo, same[f].hi) == (0.0, 0.0, 0.0)
        assert not same[f].excludes_zero
    # Only shared ids count: b scores 5 of the scenarios (plus one a lacks), each 0.01 better.
    b = [{**r, "metametric": r["metametric"] + 0.01} for r in records[3:]]
    b.append({**records[0], "scenario_id": "not-in-a"})
    diff = paired_difference(records, b, ["metametric"])["metametric"]
    assert diff.mean == pytest.approx(0.01) and diff.lo == pytest.approx(0.01) and diff.excludes_zero
    # Unpaired, the two runs' intervals overlap: pairing removes what the scenarios share.
    ci_a = bootstrap_ci(records[3:], ["metametric"])["metametric"]
    ci_b = bootstrap_ci(b[:-1], ["metametric"])["metametric"]
    assert ci_b[0] < ci_a[1]
    # The mean difference is the difference of the aggregates on the shared scenarios.
    other = [{**r, "metametric": records[(k + 1) % NUM_SCENARIOS]["metametric"]} for k, r in enumerate(records)]
    d = paired_difference(records, other, ["metametric"])["metametric"]
    assert d.mean == pytest.approx(aggregate_metrics(other)["metametric"] - aggregate_metrics(records)["metametric"],
                                   abs=1e-12)
    assert d.lo < d.mean < d.hi


def test_seed_then_scenario_bootstrap(records):
    # One seed: the scenario bootstrap (the records are in id order, as the seed version sorts them).
    one = seed_bootstrap([records], HEADLINE_FIELDS)
    assert {f: (i.lo, i.hi) for f, i in one.items()} == bootstrap_ci(records, HEADLINE_FIELDS)
    # Three seeds, one of them 0.1 better everywhere: the mean over seeds, and an interval that
    # is wider than one seed's since seeds disagree.
    better = [{**r, "metametric": r["metametric"] + 0.1} for r in records]
    three = seed_bootstrap([records, records[::-1], better], ["metametric"])["metametric"]
    assert three.mean == pytest.approx(aggregate_metrics(records)["metametric"] + 0.1 / 3)
    assert three.lo <= three.mean <= three.hi
    assert three.hi - three.lo > one["metametric"].hi - one["metametric"].lo
    # Across seeds, a run against itself still differs by exactly 0.
    zero = paired_seed_difference([records, better], [records[::-1], better[::-1]], ["metametric"])["metametric"]
    assert (zero.mean, zero.lo, zero.hi) == (0.0, 0.0, 0.0)


def test_windows_of_one_scene_and_one_network_are_one_unit(records):
    """Two windows of a recorded scene (`<id>_w0`, `<id>_w1`), or two scenarios cut from one SUMO
    network, are one independent unit: a set where every scene appears as two identical windows
    has the interval of the set of scenes (not a narrower one, as if it held twice the scenes)."""
    assert unit_labels(["a_w0", "a_w1", "b", "sumo-0-0003-00040-1", "sumo-0-0003-00120-0", "sumo-0-0004-00040-1"]
                       ).tolist() == [0, 0, 1, 2, 2, 3]
    windows = [{**r, "scenario_id": f"{r['scenario_id']}_w{w}"} for r in records for w in (0, 1)]
    assert bootstrap_ci(windows, ["metametric"]) == bootstrap_ci(records, ["metametric"])
    pretend_independent = [{**r, "scenario_id": f"{r['scenario_id']}x{w}"} for r in records for w in (0, 1)]
    assert _width(bootstrap_ci(pretend_independent, ["metametric"])["metametric"]) < \
        _width(bootstrap_ci(records, ["metametric"])["metametric"])


def test_crossed_t_interval():
    """One seed: the textbook t-interval over units. Several seeds with seed and unit effects: the
    interval covers the true mean about 95% of the time (a bootstrap over 3 seeds covers far less),
    and it is wider than ignoring the seeds' spread."""
    from scipy import stats

    rng = np.random.default_rng(0)
    x = rng.normal(0.6, 0.1, size=(1, 30, 1))
    mean, lo, hi = crossed_t_interval(x)
    half = stats.t.ppf(0.975, 29) * x[0, :, 0].std(ddof=1) / np.sqrt(30)
    assert mean[0] == pytest.approx(x.mean()) and hi[0] - mean[0] == pytest.approx(half, rel=1e-9)

    covered, trials = 0, 400
    for _ in range(trials):  # 3 seeds x 30 units: seed effect sd 0.03, unit effect sd 0.1, noise sd 0.03
        values = (rng.normal(0, 0.03, (3, 1, 1)) + rng.normal(0, 0.1, (1, 30, 1))
                  + rng.normal(0, 0.03, (3, 30, 1)))
        _, lo, hi = crossed_t_interval(values)
        covered += lo[0] <= 0.0 <= hi[0]
    assert 0.9 <= covered / trials <= 0.99
    # units: two identical windows of each unit give the interval of the units alone
    twice = np.repeat(values, 2, axis=1)
    assert np.allclose(crossed_t_interval(twice, np.repeat(np.arange(30), 2))[1], crossed_t_interval(values)[1])


def test_bad_inputs(records):
    with pytest.raises(ValueError, match="at least 2 independent units"):
        bootstrap_ci(records[:1], ["metametric"])
    with pytest.raises(ValueError, match="scenario 1: metametric is nan"):
        bootstrap_ci([records[0], {**records[1], "metametric": float("nan")}], ["metametric"])
    with pytest.raises(ValueError, match="appears twice"):
        paired_difference(records + records[:1], records, ["metametric"])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(records, ["metametric"], level=95)
    assert headline_intervals(records[:1]) == {f"{f}_ci95": None for f in HEADLINE_FIELDS}
    assert headline_intervals(records)["metametric_ci95"] == list(bootstrap_ci(records, ["metametric"])["metametric"])


def test_stage_differences_from_score_files(records, tmp_path):
    from smart_r1.storage import write_json

    better = [{**r, "simulated_collision_rate": r["simulated_collision_rate"] - 0.25} for r in records]
    for stage, recs in (("bc", records), ("rft", better)):
        write_json(scores_path(tmp_path / stage, "heldout"), {"num_rollouts": 2, "records": recs})
        write_json(scores_path(tmp_path / stage, "real"), {"num_rollouts": 2, "records": recs[:1]})
    table = stage_differences({"bc": tmp_path / "bc", "rft": tmp_path / "rft", "sft": tmp_path / "sft"},
                              ["heldout", "real"])
    lines = table.splitlines()
    assert lines[2] == "| bc -> rft | heldout | +0.0000 [0.000, 0.000] | -0.2500 [-0.250, -0.250] * | " \
                       "+0.0000 [0.000, 0.000] | +0.0000 [0.00, 0.00] | +0.0000 [0.000, 0.000] | 8 |"
    assert lines[3] == "| rft -> sft | heldout | - | - | - | - | - | 0 |"  # sft has no score file
    assert lines[4] == "| bc -> rft | real | - | - | - | - | - | 1 |"  # one scenario: no interval


# -- smart-r1 compare-runs ---------------------------------------------------------------------

def _write_run(folder, seed: int, stages: dict[str, list[dict]]) -> None:
    """A pipeline out_dir as the pipeline leaves it: config.json and each stage's score file."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"seed": seed, "out_dir": str(folder),
                                                    "stages": [{"name": s} for s in stages]}))
    for name, recs in stages.items():
        (folder / name).mkdir()
        (folder / name / "scores_heldout.json").write_text(json.dumps(
            {"dataset": "heldout", "checkpoint": "model.pt", "num_rollouts": 2, "failed": [], "records": recs}))


def test_compare_runs_cli(records, tmp_path, capsys):
    from smart_r1.cli import main

    # Seed s scores scenario j as the real record (j + s) mod 8 scored; "sft" adds 0.05 to every
    # scenario's metametric and leaves the rest unchanged.
    runs = []
    for seed in range(3):
        bc = [{**records[(j + seed) % NUM_SCENARIOS], "scenario_id": f"s{j}"} for j in range(NUM_SCENARIOS)]
        sft = [{**r, "metametric": r["metametric"] + 0.05} for r in bc]
        _write_run(tmp_path / f"run{seed}", seed, {"bc": bc, "sft": sft})
        runs.append(str(tmp_path / f"run{seed}"))
    out = tmp_path / "compare.md"
    assert main(["compare-runs", *runs, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = out.read_text()
    assert report in printed
    assert "| 3 | 0, 1, 2 | heldout | - |" in report  # runs, seeds, data, no other config change
    mean = aggregate_metrics(records)["metametric"]  # every seed sees all 8 records
    bc_row = next(line for line in report.splitlines() if line.startswith("| bc |"))
    assert bc_row.startswith(f"| bc | {mean:.4f} [") and bc_row.endswith("| 8 | 2 | - |")  # no travel ratios
    diff_row = next(line for line in report.splitlines() if line.startswith("| bc -> sft |"))
    cells = [c.strip() for c in diff_row.strip("|").split("|")]
    assert cells[1] == "+0.0500 [0.050, 0.050] *"  # excludes 0
    assert cells[2] == "+0.0000 [0.000, 0.000]" and cells[6] == "8"

    # Each seed's mean travel ratio, seed by seed (not pooled: seeds may sit either side of 1).
    moving = []
    for seed in range(3):
        bc = [{**records[j], "scenario_id": f"s{j}", "travel_ratio": 0.5 * (seed + 1) + (0.2 if j % 2 else 0.0)}
              for j in range(NUM_SCENARIOS)]
        _write_run(tmp_path / f"moving{seed}", seed, {"bc": bc})
        moving.append(str(tmp_path / f"moving{seed}"))
    assert main(["compare-runs", *moving]) == 0
    bc_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| bc |"))
    assert bc_row.endswith("| 8 | 2 | 0.60 / 1.10 / 1.60 |")

    # A folder that is not a run: one line, exit status 2.
    assert main(["compare-runs", runs[0], str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no config.json" in err


def test_compare_runs_against_a_baseline_configuration(records, tmp_path, capsys):
    """Three stages per run: the first -> last row; and --against runs of another configuration
    (the same seeds) gives each stage's paired difference, exact where every scenario moves alike."""
    from smart_r1.cli import main

    runs, base = [], []
    for seed in range(3):
        bc = [{**records[(j + seed) % NUM_SCENARIOS], "scenario_id": f"s{j}"} for j in range(NUM_SCENARIOS)]
        shifted = lambda d: [{**r, "metametric": r["metametric"] + d} for r in bc]  # noqa: E731
        _write_run(tmp_path / f"new{seed}", seed, {"bc": bc, "sft": shifted(0.05), "rft": shifted(0.08)})
        _write_run(tmp_path / f"old{seed}", seed, {"bc": bc, "sft": shifted(0.02), "rft": shifted(0.08)})
        runs.append(str(tmp_path / f"new{seed}"))
        base.append(str(tmp_path / f"old{seed}"))
    assert main(["compare-runs", *runs, "--against", *base]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = lambda label: [c.strip() for c in next(x for x in lines if x.startswith(f"| {label} |")).strip("|").split("|")]  # noqa: E731
    assert row("bc -> rft")[1] == "+0.0800 [0.080, 0.080] *"  # first -> last
    against = lines[next(i for i, x in enumerate(lines) if x.startswith("Against the baseline runs")):]
    cells = {x.split("|")[1].strip(): [c.strip() for c in x.strip("|").split("|")] for x in against if x.startswith("| ")}
    assert cells["bc"][1] == "+0.0000 [0.000, 0.000]"
    assert cells["sft"][1] == "+0.0300 [0.030, 0.030] *" and cells["sft"][6] == "8"
    assert cells["rft"][1] == "+0.0000 [0.000, 0.000]"
    # one baseline run per run, in the same seed order
    assert main(["compare-runs", *runs, "--against", *base[:2]]) == 2
    assert "one per run" in capsys.readouterr().err
    assert main(["compare-runs", *runs, "--against", *base[::-1]]) == 2
    assert "same order" in capsys.readouterr().err


def test_compare_runs_reads_runs_in_a_bucket(records, tmp_path, moto_s3, monkeypatch):
    """Runs whose out_dir is a bucket (a cluster run's storage root) give the same report as the
    same runs in local folders."""
    from smart_r1.metrics.intervals import compare_runs
    from smart_r1.storage import copy_tree

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, "testing")
    local, remote = [], []
    for seed in range(2):
        bc = [{**records[(j + seed) % NUM_SCENARIOS], "scenario_id": f"s{j}"} for j in range(NUM_SCENARIOS)]
        rft = [{**r, "metametric": r["metametric"] + 0.02 * (j % 3)} for j, r in enumerate(bc)]
        _write_run(tmp_path / f"run{seed}", seed, {"bc": bc, "rft": rft})
        local.append(str(tmp_path / f"run{seed}"))
        remote.append(f"s3://smart-r1/compare-{tmp_path.name}/run{seed}?{moto_s3}")
        copy_tree(local[-1], remote[-1])
    assert compare_runs(remote) == compare_runs(local)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        compare_runs([remote[0], f"s3://smart-r1/compare-{tmp_path.name}/none?{moto_s3}"])


def test_compare_runs_names_the_settings_that_differ_not_the_defaults_left_out():
    """compare-runs' 'configs also differ in': dotted keys; an option an older run did not write
    (at its default) is no difference; seed and out_dir never are."""
    from pathlib import Path

    from smart_r1.config import load_config
    from smart_r1.metrics.intervals import _differing_keys

    default = Path(__file__).resolve().parents[2] / "pipelines" / "sft_rft_sft.yaml"
    written = lambda overrides=(): json.loads(json.dumps(load_config(default, list(overrides)).to_dict()))  # noqa: E731
    new = written()  # as config.json holds it
    older = written(["seed=4", "out_dir=elsewhere"])
    for stage in older["stages"]:
        stage.pop("progress_both_ways", None)  # written by later versions only
    assert _differing_keys([older], new) == []
    changed = written(["rft.beta=0.1", "eval.num_rollouts=4"])
    assert _differing_keys([new, changed], new) == ["eval.num_rollouts", "stages.rft.beta"]
