"""The sweep's results: one row per trial, the ranking that picks the best, and its tables.

Objective: the realism meta metric on the sweep's ranking data set (a tune split: settings are
chosen there, never on a report split) after the last stage (higher is better). Meta
metrics that agree to 4 decimals (the table's precision, below the noise of a few rollouts) tie;
ties go to the lower collision + off-road rate, then the lower minADE.

Each finished trial's headline figures carry a 95% bootstrap interval over its held-out scenarios
(from its last stage's score file), and a second table gives every other trial's paired
difference to the best on the scenarios both scored: whether the best is distinguishable from
the rest, or the sweep's ranking is within noise.
"""

from __future__ import annotations

from pathlib import Path

from smart_r1.metrics.intervals import (DIFFERENCE_FIELDS, headline_intervals, paired_difference, read_scores,
                                        scores_path, shared_ids)
from smart_r1.metrics.tables import HEADLINE, difference_table, metrics_table
from smart_r1.storage import exists, join

METRICS = tuple(name for _, name, _ in HEADLINE)


def rank_key(row: dict) -> tuple:
    """Sort key, best first: meta metric (to 4 decimals), then collision + off-road, then minADE."""
    m = row["metrics"]
    return (-round(m["metametric"], 4), m["simulated_collision_rate"] + m["simulated_offroad_rate"],
            m["min_average_displacement_error"])


def best_row(rows: list[dict]) -> dict:
    """The best trial among those that finished every stage."""
    complete = [r for r in rows if r["status"] == "complete"]
    if not complete:
        raise RuntimeError("no trial of the sweep finished all its stages")
    return min(complete, key=rank_key)


def format_sweep_table(rows: list[dict]) -> str:
    """Markdown table, best first (finished trials, then stopped or failed ones)."""
    ordered = sorted(rows, key=lambda r: (r["status"] != "complete", rank_key(r) if r["metrics"] else ()))
    return metrics_table(("alpha", "beta"), [
        ((_alpha(r["alpha"]), f"{r['beta']:.3g}",
          r["trial_id"] + ("" if r["status"] == "complete" else f" ({r['status']})")), r["metrics"])
        for r in ordered], trailing=("trial",))


def trial_row(result) -> dict:
    """One trial of a ResultGrid as a plain row (its last report)."""
    m = result.metrics or {}
    metrics = {k: float(m[k]) for k in METRICS if k in m} if all(k in m for k in METRICS[:4]) else None
    if result.error is not None:
        status = "error"
    elif m.get("complete"):
        status = "complete"
    else:
        status = f"stopped after {m.get('stage', 'start')}"
    alpha = result.config["alpha"]
    return {"trial_id": m.get("trial_id") or Path(result.path).name,
            "alpha": alpha if isinstance(alpha, str) else float(alpha),
            "beta": float(result.config["beta"]), "status": status, "metrics": metrics}


def _alpha(alpha: float | str) -> str:
    """An alpha as shown: a number to 3 digits, or its baseline word (auto, loo)."""
    return alpha if isinstance(alpha, str) else f"{alpha:.3g}"


def trial_dir(trials_dir: str, trial_id: str, alpha: float | str, beta: float) -> str:
    """A trial's run folder (its stages, score files and MLflow run id) under the sweep's root."""
    return join(trials_dir, f"{trial_id}_alpha={alpha if isinstance(alpha, str) else f'{alpha:.4g}'}_beta={beta:.4g}")


def _last_scores(row: dict, trials_dir: str, last_stage: str, dataset: str) -> list[dict] | None:
    path = scores_path(join(trial_dir(trials_dir, row["trial_id"], row["alpha"], row["beta"]), last_stage), dataset)
    return read_scores(path)["records"] if row["status"] == "complete" and exists(path) else None


def add_intervals(rows: list[dict], trials_dir: str, last_stage: str, dataset: str, n_boot: int = 2000) -> str:
    """Put each finished trial's `<field>_ci95` (bootstrap over the independent units of its scores
    on `dataset`) into its row's metrics, and return the markdown table of every other finished
    trial's paired difference to the best (trial - best; '*' where the interval excludes 0)."""
    scores = {r["trial_id"]: _last_scores(r, trials_dir, last_stage, dataset) for r in rows}
    for r in rows:
        if scores[r["trial_id"]] is not None and r["metrics"] is not None:
            r["metrics"].update(headline_intervals(scores[r["trial_id"]], n_boot))
    best = best_row(rows)
    reference = scores[best["trial_id"]]
    diffs = []
    for r in sorted(rows, key=lambda r: (r["status"] != "complete", rank_key(r) if r["metrics"] else ())):
        if r is best or r["status"] != "complete":
            continue
        records, diff, count = scores[r["trial_id"]], None, 0
        if reference is not None and records is not None:
            count = len(shared_ids([reference, records]))
            diff = paired_difference(reference, records, DIFFERENCE_FIELDS, n_boot) if count >= 2 else None
        diffs.append(((_alpha(r["alpha"]), f"{r['beta']:.3g}", r["trial_id"], count), diff))
    return difference_table(("alpha", "beta"), diffs, trailing=("trial", "scenarios"))


def sweep_report(rows: list[dict], trials_dir: str, last_stage: str, dataset: str, n_boot: int = 2000) -> str:
    """The sweep's results.md: the trial table on `dataset` (best first, with intervals) and the
    paired differences to the best trial."""
    diffs = add_intervals(rows, trials_dir, last_stage, dataset, n_boot)
    best = best_row(rows)
    return "\n\n".join([
        f"Figures on {dataset} after `{last_stage}` with their 95% interval (bootstrap over its scenes or "
        "networks), best first:",
        format_sweep_table(rows),
        f"Paired difference of each finished trial to the best (alpha={_alpha(best['alpha'])}, "
        f"beta={best['beta']:.3g}), "
        "trial - best on the scenarios both scored; * the interval excludes 0:",
        diffs]) + "\n"
