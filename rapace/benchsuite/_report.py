"""The run as a table, as JSON, and as a bar chart."""

from __future__ import annotations

import importlib
import math
import textwrap
from pathlib import Path
from typing import Any

from rapace.benchsuite._model import (
    BASELINES,
    ROWS,
    Measurement,
    Results,
    RowSpec,
    rapace_column,
)
from rapace.benchsuite._suite import Run

__all__ = ("LEGEND", "format_table", "load_matplotlib", "ratio", "to_json", "write_png")

SHORT = {
    "ProcessPoolExecutor": "PPE",
    "multiprocessing.Pipe": "Pipe",
    "pyzmq": "pyzmq",
    "loky": "loky",
}

LEGEND = (
    "PPE: concurrent.futures.ProcessPoolExecutor (spawn); Pipe: multiprocessing.Pipe, pickled "
    "messages, one peer process; pyzmq: DEALER -> ROUTER over ipc://, one peer process, "
    "payloads sent with copy=False; loky: loky.ProcessPoolExecutor. limit: a physical "
    "floor, not a peer (ring: raw "
    "shared-memory ring + eventfd, no rapace code; copy: one 64 MiB memory copy). vs best: "
    "how many times faster rapace is than the best peer baseline of the row (>1 = rapace "
    "faster), taking rapace shm (or the first transport run)."
)


def _rows(results: Results) -> list[RowSpec]:
    return [row for row in ROWS if row.key in results.cells or row.key in results.limits]


def label(results: Results, row: RowSpec) -> str:
    return results.labels.get(row.key, row.label)


def format_value(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1e6:
        return f"{value / 1e6:.2f}M"
    if magnitude >= 1e4:
        return f"{value / 1e3:.0f}k"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio(run: Run, row: RowSpec) -> tuple[float, str, str] | None:
    """(times faster, rapace transport, baseline) of rapace against the row's best peer."""
    results = run.results
    mine: tuple[float, str] | None = None
    for transport in run.config.transports:
        cell = results.get(row.key, rapace_column(transport))
        if cell is not None and cell.value is not None and cell.value > 0:
            mine = (cell.value, transport)
            break
    best: tuple[float, str] | None = None
    for name in BASELINES:
        cell = results.get(row.key, name)
        if cell is None or cell.value is None or cell.value <= 0:
            continue
        if best is None or (
            cell.value < best[0] if row.better == "lower" else cell.value > best[0]
        ):
            best = (cell.value, name)
    if mine is None or best is None:
        return None
    times = best[0] / mine[0] if row.better == "lower" else mine[0] / best[0]
    return times, mine[1], best[1]


def _best_limit(results: Results, row: RowSpec) -> Measurement | None:
    limits = [m for m in results.limits.get(row.key, []) if m.value is not None]
    if not limits:
        return None
    pick = min if row.better == "lower" else max
    return pick(limits, key=lambda m: m.value or 0.0)


def format_table(run: Run) -> list[str]:
    """The table, a line per row, then the footnotes and the legend."""
    results = run.results
    rows = _rows(results)
    columns = [rapace_column(t) for t in run.config.transports]
    baselines = [b for b in BASELINES if any(b in results.cells.get(r.key, {}) for r in rows)]
    has_limits = any(_best_limit(results, row) is not None for row in rows)
    footnotes: dict[str, int] = {}

    def cell_text(cell: Measurement | None) -> str:
        if cell is None:
            return ""
        if cell.value is None:
            note = cell.note or "n/a"
            number = footnotes.setdefault(note, len(footnotes) + 1)
            word = "error" if note.startswith("error") else "n/a"
            return f"{word}[{number}]"
        return format_value(cell.value)

    header = ["workload", "unit", *(c.removeprefix("rapace ") for c in columns)]
    header += [SHORT[b] for b in baselines]
    if has_limits:
        header.append("limit")
    header.append("vs best")
    table: list[list[str]] = []
    for row in rows:
        line = [label(results, row), row.unit]
        line += [cell_text(results.get(row.key, column)) for column in columns]
        line += [cell_text(results.get(row.key, b)) for b in baselines]
        if has_limits:
            limit = _best_limit(results, row)
            line.append(
                f"{format_value(limit.value)} {limit.name}" if limit and limit.value else ""
            )
        found = ratio(run, row)
        line.append(f"{found[0]:.2f}x {SHORT[found[2]]}" if found else "")
        table.append(line)
    if not any(line[-1] for line in table):  # no row has both rapace and a peer
        header.pop()
        for line in table:
            line.pop()
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]

    def render(line: list[str]) -> str:
        parts = [line[0].ljust(widths[0]), line[1].ljust(widths[1])]
        parts += [text.rjust(width) for text, width in zip(line[2:], widths[2:], strict=True)]
        return "  ".join(parts).rstrip()

    machine = run.machine
    mode = "quick run" if run.config.quick else "default run"
    out = [
        f"rapace bench: {machine['cpu_model']}, {machine['cpus']} CPUs, {machine['python']}, "
        f"{machine['platform']}; {machine['date']}; {mode}, {run.seconds:.0f} s",
        "",
        render(header),
        render(["-" * w for w in widths]),
        *(render(line) for line in table),
    ]
    if footnotes:
        out.append("")
        out += [f"[{number}] {note}" for note, number in footnotes.items()]
    if results.notes:
        out.append("")
        out += [f"note: {note}" for note in results.notes]
    out.append("")
    out += textwrap.wrap(LEGEND, width=100)
    return out


def to_json(run: Run) -> dict[str, Any]:
    results = run.results
    rows = []
    for row in _rows(results):
        found = ratio(run, row)
        rows.append(
            {
                "key": row.key,
                "workload": row.workload,
                "label": label(results, row),
                "unit": row.unit,
                "better": row.better,
                "cells": {
                    column: cell.as_json()
                    for column, cell in results.cells.get(row.key, {}).items()
                },
                "limits": [m.as_json() for m in results.limits.get(row.key, [])],
                "vs_best_baseline": (
                    {"times_faster": found[0], "transport": found[1], "baseline": found[2]}
                    if found
                    else None
                ),
            }
        )
    return {
        "machine": run.machine,
        "config": run.config_json(),
        "duration_s": run.seconds,
        "rows": rows,
        "notes": results.notes,
    }


def load_matplotlib() -> Any:
    """pyplot on the Agg backend, or ImportError when matplotlib is not installed."""
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def write_png(run: Run, path: Path) -> None:
    """One bar chart per row: rapace's transports, the baselines, the best limit."""
    plt = load_matplotlib()
    results = run.results
    rows = _rows(results)
    if not rows:
        raise ValueError("nothing was measured")
    ncols = min(3, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(rows) :]:
        ax.set_visible(False)
    for ax, row in zip(axes.flat, rows, strict=False):
        names: list[str] = []
        values: list[float] = []
        colours: list[str] = []
        for transport in run.config.transports:
            cell = results.get(row.key, rapace_column(transport))
            if cell is not None and cell.value is not None:
                names.append(transport)
                values.append(cell.value)
                colours.append("tab:blue")
        for name in BASELINES:
            cell = results.get(row.key, name)
            if cell is not None and cell.value is not None:
                names.append(SHORT[name])
                values.append(cell.value)
                colours.append("tab:orange")
        limit = _best_limit(results, row)
        if limit is not None and limit.value is not None:
            names.append(limit.name or "limit")
            values.append(limit.value)
            colours.append("tab:gray")
        ax.bar(range(len(values)), values, color=colours)
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        better = "lower" if row.better == "lower" else "higher"
        ax.set_title(f"{label(results, row)}\n{row.unit}, {better} is better", fontsize=9)
        if not values:
            ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
    machine = run.machine
    fig.suptitle(
        f"rapace bench ({'quick' if run.config.quick else 'default'}): {machine['cpu_model']}, "
        f"{machine['cpus']} CPUs, {machine['python']}, {machine['date']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
