"""Markdown tables of WOSAC metrics: the one formatter behind the pipeline's stage table, the
sweep's trial table and the CLI's leaderboard."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# The headline columns: (header, SimAgentMetrics field, format).
HEADLINE = (("realism meta", "metametric", "{:.4f}"),
            ("collision rate", "simulated_collision_rate", "{:.4f}"),
            ("off-road rate", "simulated_offroad_rate", "{:.4f}"),
            ("minADE (m)", "min_average_displacement_error", "{:.3f}"))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def headline_cells(metrics: Mapping[str, float] | None) -> list[str]:
    """The headline metrics of one row, formatted ('-' for a row without metrics)."""
    if metrics is None:
        return ["-"] * len(HEADLINE)
    return [fmt.format(metrics[name]) for _, name, fmt in HEADLINE]


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
