"""The sweep's results: one row per trial, the ranking that picks the best, and its table.

Objective: the held-out realism meta metric after the last stage (higher is better). Meta
metrics that agree to 4 decimals (the table's precision, below the noise of a few rollouts) tie;
ties go to the lower collision + off-road rate, then the lower minADE.
"""

from __future__ import annotations

from pathlib import Path

from smart_r1.metrics.tables import HEADLINE, metrics_table

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
        ((f"{r['alpha']:.3g}", f"{r['beta']:.3g}",
          r["trial_id"] + ("" if r["status"] == "complete" else f" ({r['status']})")), r["metrics"])
        for r in ordered], trailing=("trial",))


def trial_row(result) -> dict:
    """One trial of a ResultGrid as a plain row (its last report)."""
    m = result.metrics or {}
    metrics = {k: float(m[k]) for k in METRICS} if all(k in m for k in METRICS) else None
    if result.error is not None:
        status = "error"
    elif m.get("complete"):
        status = "complete"
    else:
        status = f"stopped after {m.get('stage', 'start')}"
    return {"trial_id": m.get("trial_id") or Path(result.path).name, "alpha": float(result.config["alpha"]),
            "beta": float(result.config["beta"]), "status": status, "metrics": metrics}
