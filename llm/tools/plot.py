"""PNG charts of a run, one file per section of llm/observe/metrics.py (loss, optimizer, throughput, memory)
and all of them on one page, from its metrics.csv."""

from __future__ import annotations

import csv
from pathlib import Path

from llm.errors import ConfigError
from llm.observe.metrics import SECTIONS, X_AXES, Chart, charts


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.csv"
    if not path.is_file():
        raise ConfigError(f"run={run}: has no metrics.csv; give a run folder, e.g. RUN=runs/<name>")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def series(rows: list[dict], column: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x, y) of one column: x is steps done (metrics.csv's step, from 1) or tokens trained."""
    if x == "step":
        points = [(float(r["step"]), float(r[column])) for r in rows if r.get(column)]
    else:
        points = [(float(r[X_AXES[x]]), float(r[column])) for r in rows if r.get(column) and r.get(X_AXES[x])]
    return [p[0] for p in points], [p[1] for p in points]


def chart_series(chart: Chart, rows: list[dict]) -> list[tuple[str, str]]:
    """A chart's (key, legend) pairs: its own, or the run's columns its pattern matches."""
    if chart.pattern is None:
        return list(chart.series)
    columns = dict.fromkeys(k for r in rows for k, v in r.items() if v and chart.matches(k))
    return [(key, key.removeprefix("eval/")) for key in sorted(columns)]


def _draw(ax, chart, rows: list[dict], x: str) -> None:
    for key, legend in chart_series(chart, rows):
        xs, ys = series(rows, key, x)
        if xs:
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=legend)
    ax.set(title=chart.title, xlabel=x, ylabel=chart.unit)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def plot(run: str, x: str = "step") -> list[str]:
    """Write one PNG per section of the logged metrics (loss, optimizer, throughput, memory) into
    <run>/plots/, and all of them on one page as overview.png.

    Args:
        run: a run folder (RUN=), e.g. runs/default-20261128-120000
        x: the x-axis, step or tokens
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    if x not in X_AXES:
        raise ConfigError(f"x={x}: not an x-axis; use one of {', '.join(X_AXES)}")
    folder = Path(run)
    rows = read_metrics(folder)
    out = folder / "plots"
    out.mkdir(exist_ok=True)
    written, contents = [], []
    # a section of charts only some runs log (distillation's, benchmarks') is drawn for the runs that logged them
    logged = {k for r in rows for k, v in r.items() if v}
    sections = [s for s in SECTIONS if any(c.only is None or any(map(c.matches, logged)) for c in charts(s))]
    width = max(len(charts(s)) for s in sections)
    overview, grid = plt.subplots(len(sections), width, figsize=(4.2 * width, 3.2 * len(sections)), squeeze=False)
    for section, row in zip(sections, grid, strict=True):
        items = charts(section)
        figure, axes = plt.subplots(1, len(items), figsize=(4.5 * len(items), 3.6), squeeze=False)
        for chart, ax, overview_ax in zip(items, axes[0], row, strict=False):
            _draw(ax, chart, rows, x)
            _draw(overview_ax, chart, rows, x)
        for unused in row[len(items) :]:
            unused.axis("off")
        name = f"{section.lower()}.png"
        # a series the run never logged shows as 0 points
        contents.append(
            f"{name}: " + ", ".join(f"{k} {len(series(rows, k)[0])}" for c in items for k, _ in chart_series(c, rows))
        )
        figure.tight_layout()
        figure.savefig(out / name, dpi=90)
        plt.close(figure)
        written.append(str(out / name))
    overview.suptitle(folder.name)
    overview.tight_layout()
    overview.savefig(out / "overview.png", dpi=80)
    plt.close(overview)
    written.append(str(out / "overview.png"))
    for path in written:
        print(f"wrote {path}")
    for line in contents:
        print(line)
    return written


def tui(run: str) -> None:
    """Open a run in W&B's terminal viewer (`wandb leet`).

    Args:
        run: a run folder (RUN=), e.g. runs/default-20261128-120000
    """
    import os
    import shutil
    import sys

    wandb_dir = Path(run) / "wandb"
    if not wandb_dir.is_dir():
        raise ConfigError(f"run={run}: has no wandb/ folder; give a run folder, e.g. RUN=runs/<name>")
    if not sys.stdin.isatty():
        raise ConfigError(
            f"run={run}: it needs a terminal to open in; `wandb leet inspect --summary {wandb_dir}` prints instead"
        )
    wandb = shutil.which("wandb", path=os.path.dirname(sys.executable)) or "wandb"
    os.execv(wandb, [wandb, "leet", str(wandb_dir)])
