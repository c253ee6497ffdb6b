"""Confidence intervals of the WOSAC aggregates: a percentile bootstrap over independent units,
paired differences between two checkpoints on the scenarios both scored, a crossed random-effects
t-interval over training seeds and units; the pipeline's per-scenario score files and the
multi-seed report.

The unit of resampling is what a scenario is an independent draw of
(`smart_r1.data.splits.independent_unit`): a real scenario's recorded scene (its 9.1 s windows
share one recording), a generated SUMO scenario's network (its windows and self-driving cars share
the network's traffic). Resampling scenarios as if independent would make intervals too narrow.

Every dataset-level figure is a plain mean over scenarios of one per-scenario field
(`aggregate_metrics`: the realism metametric too is the mean of the per-scenario metametric), so
a resample is a vector of counts c [n] (how often each of n scenarios was drawn; sum n) and its
aggregate is c @ X / n, with X [n, F] the per-scenario fields: every resample of every field in
one matrix product, equal to `aggregate_metrics` for c = 1. The interval is the percentile one:
the (1 - level) / 2 and (1 + level) / 2 quantiles of the resampled aggregates.

Across seeds (runs that differ only by their seed, scored on the same scenarios) the figure is
the mean over seeds of each seed's mean over scenarios, X [S, n, F]. A resample draws S seeds
with replacement, then n scenarios with replacement, and uses the same scenario draw for every
drawn seed: the scenarios are shared, so a hard scenario is hard for every seed, and drawing
them apart per seed would average that away and understate the spread (a crossed, not a nested,
design). With one seed it is the scenario bootstrap. Scenarios are resampled unit by unit (every
scenario of a drawn unit, as often as the unit is drawn).

With few seeds a bootstrap over them sees too few distinct resamples (3 seeds give 10), so the
multi-seed report uses `crossed_t_interval` instead: seeds and units are two crossed random
factors; the variance of the grand mean is estimated from the two-way ANOVA mean squares of the
[seed, unit] table, (MS_seed + MS_unit - MS_residual) / (S u), with Satterthwaite's degrees of
freedom for the t quantile. With one seed it is the t-interval over units.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from smart_r1.data.splits import independent_unit
from smart_r1.metrics.leaderboard import CATEGORY_FIELDS, with_categories
from smart_r1.metrics.signals import mean_travel_ratio
from smart_r1.metrics.tables import HEADLINE, difference_table, markdown_table, metrics_table
from smart_r1.storage import display, exists, join, read_json, read_text

Records = Sequence[Mapping[str, object]]  # per-scenario metric dicts, each with a scenario_id
HEADLINE_FIELDS = tuple(name for _, name, _ in HEADLINE)
DIFFERENCE_FIELDS = HEADLINE_FIELDS  # realism, collision, off-road, minADE, kinematic
SCORES_FILE = "scores_{dataset}.json"


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile-bootstrap interval [lo, hi]."""

    mean: float
    lo: float
    hi: float

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0.0 or self.hi < 0.0


def scenario_matrix(per_scenario: Records, fields: Sequence[str]) -> np.ndarray:
    """[num_scenarios, num_fields] float64 of the per-scenario metric dicts. Raises ValueError on
    a missing field or a non-finite value (naming the scenario's position)."""
    values = np.empty((len(per_scenario), len(fields)))
    for i, metrics in enumerate(per_scenario):
        if any(f in CATEGORY_FIELDS.values() and f not in metrics for f in fields):
            metrics = with_categories(metrics)  # a score file's record: the buckets from its likelihoods
        missing = [f for f in fields if f not in metrics]
        if missing:
            raise ValueError(f"scenario {i}: metrics lack the field {missing[0]!r}")
        values[i] = [float(metrics[f]) for f in fields]
    bad = ~np.isfinite(values)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"scenario {i}: {fields[j]} is {values[i, j]}")
    return values


def draw_counts(rng: np.random.Generator, n_boot: int, n: int) -> np.ndarray:
    """[n_boot, n] float64: how often each of n items is drawn in each of n_boot resamples of n
    draws with replacement (each row sums to n)."""
    draws = rng.integers(0, n, size=(n_boot, n)) + n * np.arange(n_boot)[:, None]  # row b's bins
    return np.bincount(draws.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def resampled_means(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """values [n, F], counts [B, n] -> [B, F]: each resample's mean of every field (counts of 1
    give the plain mean over scenarios, what `aggregate_metrics` computes)."""
    return counts @ values / counts.sum(axis=1, keepdims=True)


def _check(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def unit_labels(scenario_ids: Sequence[str]) -> np.ndarray:
    """[n] int: each scenario's independent unit (`independent_unit`), numbered by first appearance."""
    numbers: dict[str, int] = {}
    return np.array([numbers.setdefault(independent_unit(str(i)), len(numbers)) for i in scenario_ids], dtype=np.int64)


def seed_scenario_bootstrap(values: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                            units: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """values [S, n, F] (seeds, scenarios, fields) -> (mean, lo, hi), each [F]: the mean over
    seeds and scenarios and its interval, seeds then shared units resampled (module doc).
    units: [n] int labels of the scenarios' independent units (None: every scenario its own)."""
    _check(n_boot, level)
    num_seeds, n, _ = values.shape
    units = np.arange(n) if units is None else np.asarray(units)
    num_units = int(units.max()) + 1 if n else 0
    if num_units < 2:
        raise ValueError(f"an interval needs at least 2 independent units (scenes, networks), got {num_units}")
    rng = np.random.default_rng(seed)
    seed_w = draw_counts(rng, n_boot, num_seeds) / num_seeds  # [B, S]
    scenario_w = draw_counts(rng, n_boot, num_units)[:, units]  # [B, n]: a drawn unit brings all its scenarios
    scenario_w /= scenario_w.sum(axis=1, keepdims=True)
    samples = np.einsum("bs,snf,bn->bf", seed_w, values, scenario_w, optimize=True)  # [B, F]
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return values.mean(axis=(0, 1)), lo, hi


def crossed_t_interval(values: np.ndarray, units: np.ndarray | None = None,
                       level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """values [S, n, F] -> (mean, lo, hi), each [F]: the mean over seeds and scenarios with a
    t-interval for seeds and units as crossed random factors (module doc). Scenarios of one unit
    are averaged into it first (units: [n] labels, None: each scenario its own)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    num_seeds, n, num_fields = values.shape
    units = np.arange(n) if units is None else np.asarray(units)
    num_units = int(units.max()) + 1 if n else 0
    if num_units < 2:
        raise ValueError(f"an interval needs at least 2 independent units (scenes, networks), got {num_units}")
    sizes = np.bincount(units, minlength=num_units).astype(np.float64)  # [u]
    x = np.zeros((num_seeds, num_units, num_fields))
    np.add.at(x, (slice(None), units), values)
    x /= sizes[None, :, None]  # [S, u, F] unit means
    grand = x.mean(axis=(0, 1))
    seed_means, unit_means = x.mean(axis=1), x.mean(axis=0)  # [S, F], [u, F]
    ms_unit = num_seeds * ((unit_means - grand) ** 2).sum(0) / (num_units - 1)
    if num_seeds == 1:
        var, df = ms_unit / num_units, np.full(num_fields, num_units - 1.0)
    else:
        ms_seed = num_units * ((seed_means - grand) ** 2).sum(0) / (num_seeds - 1)
        resid = x - seed_means[:, None] - unit_means[None] + grand
        ms_resid = (resid ** 2).sum(axis=(0, 1)) / ((num_seeds - 1) * (num_units - 1))
        cells = num_seeds * num_units
        # never below the larger single-factor term: a negative variance component is taken as 0
        var = np.maximum(ms_seed + ms_unit - ms_resid, np.maximum(ms_seed, ms_unit)) / cells
        parts = ((ms_seed / cells) ** 2 / (num_seeds - 1) + (ms_unit / cells) ** 2 / (num_units - 1)
                 + (ms_resid / cells) ** 2 / ((num_seeds - 1) * (num_units - 1)))
        df = np.where(parts > 0, var ** 2 / np.where(parts > 0, parts, 1.0), num_units - 1.0)
    half = stats.t.ppf((1 + level) / 2, np.maximum(df, 1.0)) * np.sqrt(var)
    mean = values.mean(axis=(0, 1))
    return mean, mean - half, mean + half


def bootstrap_ci(per_scenario: Records, fields: Sequence[str], n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> dict[str, tuple[float, float]]:
    """{field: (lo, hi)}: the percentile-bootstrap interval of each field's mean over scenarios
    (their independent units resampled with replacement; all fields from the same resamples)."""
    units = unit_labels([str(r.get("scenario_id", i)) for i, r in enumerate(per_scenario)])
    _, lo, hi = seed_scenario_bootstrap(scenario_matrix(per_scenario, fields)[None], n_boot, seed, level, units)
    return {f: (float(lo[j]), float(hi[j])) for j, f in enumerate(fields)}


def shared_ids(runs: Sequence[Records]) -> set[str]:
    """The scenario ids every run scored."""
    return set.intersection(*({str(r["scenario_id"]) for r in records} for records in runs))


def _aligned(runs: Sequence[Records], fields: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """([len(runs), n, F], [n] unit labels): the fields of the n scenario ids every run scored, in
    sorted id order, and their independent units."""
    by_id = []
    for k, records in enumerate(runs):
        ids = [str(r["scenario_id"]) for r in records]
        if len(set(ids)) != len(ids):
            raise ValueError(f"records {k}: a scenario_id appears twice")
        by_id.append(dict(zip(ids, records)))
    shared = sorted(shared_ids(runs))
    return np.stack([scenario_matrix([d[i] for i in shared], fields) for d in by_id]), unit_labels(shared)


def _intervals(fields: Sequence[str], mean, lo, hi) -> dict[str, Interval]:
    return {f: Interval(float(mean[j]), float(lo[j]), float(hi[j])) for j, f in enumerate(fields)}


def paired_difference(per_scenario_a: Records, per_scenario_b: Records, fields: Sequence[str],
                      n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Interval]:
    """{field: Interval of mean(b - a)} over the scenario ids both scored: the per-scenario
    differences are resampled, so what the scenarios share (how hard each is) cancels."""
    (a, b), units = _aligned([per_scenario_a, per_scenario_b], fields)
    return _intervals(fields, *seed_scenario_bootstrap((b - a)[None], n_boot, seed, level, units))


def seed_bootstrap(per_seed: Sequence[Records], fields: Sequence[str], n_boot: int = 2000, seed: int = 0,
                   level: float = 0.95) -> dict[str, Interval]:
    """{field: Interval} of the mean over seeds of the mean over scenarios; `per_seed` holds one
    list of per-scenario records per training seed (scenarios matched by id, only shared ones)."""
    values, units = _aligned(per_seed, fields)
    return _intervals(fields, *seed_scenario_bootstrap(values, n_boot, seed, level, units))


def seed_t_interval(per_seed: Sequence[Records], fields: Sequence[str], level: float = 0.95) -> dict[str, Interval]:
    """{field: Interval} of the mean over seeds of the mean over scenarios: `crossed_t_interval`
    over seeds and the shared scenarios' units."""
    values, units = _aligned(per_seed, fields)
    return _intervals(fields, *crossed_t_interval(values, units, level))


def paired_seed_difference(per_seed_a: Sequence[Records], per_seed_b: Sequence[Records], fields: Sequence[str],
                           level: float = 0.95) -> dict[str, Interval]:
    """{field: Interval of mean(b - a)} across seeds: per seed, b - a on the scenarios both
    scored (and every seed scored), then `crossed_t_interval` over seeds and units."""
    if len(per_seed_a) != len(per_seed_b):
        raise ValueError(f"{len(per_seed_a)} seeds against {len(per_seed_b)}")
    values, units = _aligned([*per_seed_a, *per_seed_b], fields)  # [2S, n, F]
    a, b = np.split(values, 2)
    return _intervals(fields, *crossed_t_interval(b - a, units, level))


def headline_intervals(per_scenario: Records, n_boot: int = 2000, seed: int = 0) -> dict[str, list[float] | None]:
    """{'<field>_ci95': [lo, hi]} for every headline field (None with fewer than 2 independent
    units: an interval over one scene or network says nothing)."""
    if len(set(unit_labels([str(r.get("scenario_id", i)) for i, r in enumerate(per_scenario)]))) < 2:
        return {f"{f}_ci95": None for f in HEADLINE_FIELDS}
    return {f"{f}_ci95": list(ci) for f, ci in bootstrap_ci(per_scenario, HEADLINE_FIELDS, n_boot, seed).items()}


# -- the pipeline's score files and the reports built from them ----------------------------------

def scores_path(stage_dir: str | Path, dataset: str) -> str:
    """A stage's score file: a local path, or a URI under a bucket run root."""
    return join(stage_dir, SCORES_FILE.format(dataset=dataset))


def read_scores(path: str | Path) -> dict:
    """A stage's score file (a local path or a URI): {'dataset', 'checkpoint', 'num_rollouts',
    'failed': [messages], 'records': [{'scenario_id', SimAgentMetrics fields}]}."""
    try:
        scores = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{display(path)}: not JSON ({e})") from None
    if not isinstance(scores, dict) or not isinstance(scores.get("records"), list):
        raise ValueError(f"{display(path)}: not a score file (no 'records' list)")
    return scores


def stage_differences(stage_dirs: Mapping[str, str | Path], datasets: Sequence[str], n_boot: int = 2000) -> str:
    """Markdown table of the paired differences between consecutive stages (later - earlier) on
    each dataset, from the stages' score files (local folders or URIs); '-' where a file is
    missing or fewer than 2 scenarios are shared."""
    stages = list(stage_dirs)
    rows = []
    for dataset in datasets:
        for before, after in zip(stages, stages[1:]):
            paths = [scores_path(stage_dirs[s], dataset) for s in (before, after)]
            diff, count = None, 0
            if all(exists(p) for p in paths):
                a, b = (read_scores(p)["records"] for p in paths)
                count = len(shared_ids([a, b]))
                if count >= 2:
                    diff = paired_difference(a, b, DIFFERENCE_FIELDS, n_boot)
            rows.append(((f"{before} -> {after}", dataset, count), diff))
    return difference_table(("stages", "data"), rows, trailing=("scenarios",))


def _run_config(run: str) -> dict:
    config_path = join(run, "config.json")
    if not exists(config_path):
        raise FileNotFoundError(f"{display(run)} is not a pipeline run folder (no config.json)")
    return read_json(config_path)


def _run_stages(run: str, dataset: str) -> dict[str, dict]:
    """{stage: score file} of one run (a local folder or a bucket URI), in the order of its
    config's stages (those scored)."""
    stages = [s["name"] for s in _run_config(run).get("stages", [])]
    paths = {s: scores_path(join(run, s), dataset) for s in stages}
    out = {s: read_scores(p) for s, p in paths.items() if exists(p)}
    if not out:
        raise FileNotFoundError(f"{display(run)}: no stage has a score file {SCORES_FILE.format(dataset=dataset)}")
    return out


def _settings(config: dict) -> dict[str, object]:
    """A run's config.json as dotted keys (stages by name), options it does not write at their
    defaults (a run of an older version), so only real differences show."""
    from smart_r1.config import from_dict

    try:
        config = from_dict(config).to_dict()
    except (ValueError, TypeError, KeyError):  # a key this version no longer knows: compare as written
        pass
    flat: dict[str, object] = {}

    def walk(value, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else k)
        else:
            flat[key] = value

    walk({k: v for k, v in config.items() if k != "stages"}, "")
    walk({st.get("name", str(i)): st for i, st in enumerate(config.get("stages", []))}, "stages")
    return flat


def _differing_keys(configs: Sequence[dict], reference: dict) -> list[str]:
    """Config keys (dotted; other than seed and out_dir) in which some of `configs` differ from
    `reference`."""
    ref = _settings(reference)
    flats = [_settings(c) for c in configs]
    return sorted({k for c in flats for k in c.keys() | ref.keys()
                   if k not in ("seed", "out_dir") and c.get(k, "<absent>") != ref.get(k, "<absent>")})


def _stage_records(runs: Sequence[str], dataset: str) -> tuple[list[dict], list[dict], dict[str, list]]:
    """Configs, per-run score files and {stage: [per-run records]} of the stages scored in every run."""
    per_run = [_run_stages(r, dataset) for r in runs]
    configs = [_run_config(r) for r in runs]
    stages = [s for s in per_run[0] if all(s in p for p in per_run)]  # scored in every run
    if not stages:
        raise ValueError(f"no stage is scored on {dataset} in every run")
    return configs, per_run, {s: [p[s]["records"] for p in per_run] for s in stages}


REPORT_ORDER = ("real_report", "heldout", "sumo_heldout", "real_tune", "sumo_tune")  # compare-runs' default data


def default_dataset(run: str) -> str:
    """The data set a run's report is on when none is named: the first of REPORT_ORDER that its
    first stage was scored on."""
    stages = [s["name"] for s in _run_config(run).get("stages", [])]
    for dataset in REPORT_ORDER:
        if any(exists(scores_path(join(run, s), dataset)) for s in stages):
            return dataset
    raise FileNotFoundError(f"{display(run)}: no stage has a score file of {list(REPORT_ORDER)}")


def compare_runs(runs: Sequence[str | Path], dataset: str | None = None, against: Sequence[str | Path] = ()) -> str:
    """The multi-seed report of pipeline runs that differ only by their seed: per stage the mean
    over seeds of the headline figures with the seed-and-unit t-interval, then the paired
    differences between consecutive stages and between the first and the last stage, '*' where
    the interval excludes 0. A run is a local folder or a storage URI (`s3://...`, the run's
    `out_dir`).

    `against`: baseline runs of another configuration, one per run in the same seed order; a third
    table gives each stage's paired difference (these runs - the baseline), pairing the i-th run
    with the i-th baseline run on the scenarios both scored, the same interval."""
    runs = [str(r) for r in runs]
    dataset = dataset or default_dataset(runs[0])
    configs, per_run, records = _stage_records(runs, dataset)
    seeds = [c.get("seed") for c in configs]
    # Named, not refused: a run may differ harmlessly (Ray resources, paths).
    differ = _differing_keys(configs, configs[0])
    stages = list(records)
    rollouts = {s: sorted({int(p[s]["num_rollouts"]) for p in per_run}) for s in stages}
    rows = []
    for s in stages:
        count = len(shared_ids(records[s]))
        if count < 2:
            raise ValueError(f"stage {s}: {count} scenario(s) scored on {dataset} in every run; an interval needs 2")
        est = seed_t_interval(records[s], HEADLINE_FIELDS)
        metrics = {f: i.mean for f, i in est.items()} | {f"{f}_ci95": [i.lo, i.hi] for f, i in est.items()}
        rows.append(((s, count, "/".join(map(str, rollouts[s])), _seed_travel(records[s])), metrics))
    pairs = list(zip(stages, stages[1:])) + ([(stages[0], stages[-1])] if len(stages) > 2 else [])
    diffs = []
    for before, after in pairs:
        d = paired_seed_difference(records[before], records[after], DIFFERENCE_FIELDS)
        diffs.append(((f"{before} -> {after}", len(shared_ids(records[before] + records[after]))), d))
    header = markdown_table(("runs", "seeds", "data", "configs also differ in"),
                            [(len(runs), ", ".join(map(str, seeds)), dataset, ", ".join(differ) or "-")])
    parts = [
        header,
        "Mean over seeds with its 95% interval (t-interval with seeds and independent units, scenes or "
        "networks, as crossed random factors):",
        metrics_table(("stage",), rows, trailing=("scenarios", "rollouts", "travel ratio per seed")),
        "Paired differences between consecutive stages and from the first to the last stage "
        "(later - earlier), same interval; * the interval excludes 0:",
        difference_table(("stages",), diffs, trailing=("scenarios",)),
    ]
    if against:
        parts += _against_baseline(runs, configs, records, [str(r) for r in against], dataset)
    return "\n\n".join(parts) + "\n"


def _seed_travel(per_seed: Sequence[Records]) -> str:
    """Each seed's mean travel ratio (simulated over logged path length; 1 = the log's pace),
    '0.69 / 1.40 / 1.13': a realism gain bought by slowing agents shows here, and seeds can sit on
    either side of 1, so their mean would hide it. '-' for a run scored before the field."""
    means = [mean_travel_ratio(records) for records in per_seed]
    return "-" if all(m is None for m in means) else " / ".join("-" if m is None else f"{m:.2f}" for m in means)


def _against_baseline(runs: Sequence[str], configs: Sequence[dict], records: Mapping[str, list],
                      baseline: Sequence[str], dataset: str) -> list[str]:
    """The `against` table of `compare_runs`: per stage, these runs - the baseline runs, paired by
    position (seed order) and scenario."""
    if len(baseline) != len(runs):
        raise ValueError(f"--against: {len(baseline)} baseline run(s) for {len(runs)} run(s); give one per run, "
                         "in the same seed order")
    base_configs, _, base_records = _stage_records(baseline, dataset)
    base_seeds = [c.get("seed") for c in base_configs]
    if base_seeds != [c.get("seed") for c in configs]:
        raise ValueError(f"--against: the baseline runs' seeds {base_seeds} do not match the runs' "
                         f"{[c.get('seed') for c in configs]} (pair them in the same order)")
    stages = [s for s in records if s in base_records]
    if not stages:
        raise ValueError(f"--against: no stage is scored on {dataset} in both sets of runs")
    rows = []
    for s in stages:
        count = len(shared_ids(records[s] + base_records[s]))
        diff = paired_seed_difference(base_records[s], records[s], DIFFERENCE_FIELDS) if count >= 2 else None
        rows.append(((s, count), diff))
    changed = _differing_keys([configs[0]], base_configs[0])
    return [
        f"Against the baseline runs {', '.join(baseline)} (these - baseline, paired by seed and scenario; "
        f"the configs differ in {', '.join(changed) or 'nothing but their folders'}):",
        difference_table(("stage",), rows, trailing=("scenarios",)),
    ]
