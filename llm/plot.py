"""PNG charts of a run against step: loss, throughput, MFU and memory, from its metrics.csv."""

from __future__ import annotations

import csv
from pathlib import Path

from llm.errors import ConfigError

# chart -> (title, y label, [(column, legend)])
CHARTS = {
    "loss": ("Loss", "nats per token", [("train/loss", "train"), ("val/loss", "validation")]),
    "throughput": (
        "Throughput",
        "tokens / s",
        [("perf/tokens_per_sec", "all devices"), ("perf/tokens_per_sec_per_device", "per device")],
    ),
    "mfu": ("Model FLOPs utilisation", "MFU", [("perf/mfu", "MFU")]),
    "memory": (
        "Memory",
        "GiB",
        [
            ("mem/peak_max", "peak (max over ranks)"),
            ("mem/allocated_max", "allocated (max)"),
            ("mem/allocated_min", "allocated (min)"),
            ("mem/host_rss_max", "host RSS (max)"),
        ],
    ),
}


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.csv"
    if not path.is_file():
        raise ConfigError(f"run={run}: has no metrics.csv; give a run folder, e.g. RUN=runs/<name>")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def series(rows: list[dict], column: str) -> tuple[list[int], list[float]]:
    points = [(int(r["step"]) + 1, float(r[column])) for r in rows if r.get(column)]  # steps done, from 1
    return [p[0] for p in points], [p[1] for p in points]


def plot(run: str) -> list[str]:
    """Write loss, throughput, MFU and memory charts against step into <run>/plots/, and all four
    on one page as overview.png.

    Args:
        run: a run folder (RUN=), e.g. runs/default-20261128-120000
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    folder = Path(run)
    rows = read_metrics(folder)
    out = folder / "plots"
    out.mkdir(exist_ok=True)
    written, contents = [], []
    overview, axes = plt.subplots(2, 2, figsize=(12, 8))
    for (name, (title, ylabel, columns)), overview_ax in zip(CHARTS.items(), axes.flat, strict=True):
        figure, ax = plt.subplots(figsize=(7, 4))
        counts = [f"{legend} {len(series(rows, column)[0])} points" for column, legend in columns]
        contents.append(f"{name}.png: {', '.join(counts)}")  # a series the run never logged shows as 0
        for target in (ax, overview_ax):
            for column, legend in columns:
                steps, values = series(rows, column)
                if steps:
                    target.plot(steps, values, marker="." if len(steps) < 30 else None, label=legend)
            target.set(title=title, xlabel="step", ylabel=ylabel)
            target.grid(alpha=0.3)
            if target.get_legend_handles_labels()[0]:
                target.legend()
        figure.tight_layout()
        figure.savefig(out / f"{name}.png", dpi=100)
        plt.close(figure)
        written.append(str(out / f"{name}.png"))
    overview.suptitle(folder.name)
    overview.tight_layout()
    overview.savefig(out / "overview.png", dpi=100)
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
