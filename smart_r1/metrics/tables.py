"""Markdown tables of WOSAC metrics: the one formatter behind the pipeline's stage table, the
sweep's trial table and the CLI's leaderboard, with 95% intervals where the metrics carry them
(`<field>_ci95: [lo, hi]`, see `smart_r1.metrics.intervals`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# The headline columns: (header, SimAgentMetrics field or WOSAC bucket, format). The kinematic
# bucket (speed and acceleration likelihoods) sits beside minADE: together they show whether agents
# move like the log, which realism alone can hide (a policy that slows down avoids collisions).
HEADLINE = (("realism meta", "metametric", "{:.4f}"),
            ("collision rate", "simulated_collision_rate", "{:.4f}"),
            ("off-road rate", "simulated_offroad_rate", "{:.4f}"),
            ("minADE (m)", "min_average_displacement_error", "{:.3f}"),
            ("kinematic", "kinematic_metrics", "{:.4f}"))
# Interval bounds one digit coarser than the value: they are less certain than its last digit.
CI_FORMAT = {"metametric": "{:.3f}", "simulated_collision_rate": "{:.3f}", "simulated_offroad_rate": "{:.3f}",
             "min_average_displacement_error": "{:.2f}", "kinematic_metrics": "{:.3f}"}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def headline_cells(metrics: Mapping[str, float] | None) -> list[str]:
    """The headline metrics of one row, formatted ('-' for a row without metrics)."""
    if metrics is None:
        return ["-"] * len(HEADLINE)
    return [with_interval(fmt.format(metrics[name]), metrics.get(f"{name}_ci95"), CI_FORMAT[name])
            if name in metrics else "-" for _, name, fmt in HEADLINE]  # '-': a record from before the field


def with_interval(value: str, ci: Sequence[float] | None, fmt: str) -> str:
    """'0.6334 [0.612, 0.651]', or the value alone without an interval."""
    return value if ci is None else f"{value} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def metrics_table(labels: Sequence[str], rows: Sequence[tuple[Sequence[str], Mapping[str, float] | None]],
                  trailing: Sequence[str] = ()) -> str:
    """One row per (label cells, metrics): the label columns, the headline metrics, then
    `trailing` columns whose cells follow the label cells in each row's first element."""
    header = [*labels, *(h for h, _, _ in HEADLINE), *trailing]
    body = []
    for cells, metrics in rows:
        cells = list(cells)
        body.append([*cells[:len(labels)], *headline_cells(metrics), *cells[len(labels):]])
    return markdown_table(header, body)


def difference_table(labels: Sequence[str], rows: Sequence[tuple[Sequence[str], Mapping | None]],
                     trailing: Sequence[str] = ()) -> str:
    """One row per (label cells, {field: Interval} of a difference, or None): the signed mean
    difference of each headline field with its interval, '*' where the interval excludes 0;
    `trailing` cells follow the label cells as in `metrics_table`."""
    columns = HEADLINE
    header = [*labels, *(f"d {h}" for h, _, _ in columns), *trailing]
    body = []
    for cells, diff in rows:
        cells = list(cells)
        values = ["-"] * len(columns) if diff is None else [
            with_interval(f"{diff[name].mean:+.4f}", (diff[name].lo, diff[name].hi), CI_FORMAT[name])
            + (" *" if diff[name].excludes_zero else "") for _, name, _ in columns]
        body.append([*cells[:len(labels)], *values, *cells[len(labels):]])
    return markdown_table(header, body)
