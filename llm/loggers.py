"""Where metrics go: `metrics.csv` in the run folder (one row per step) and W&B (offline without a key)."""

from __future__ import annotations

import csv
import logging
import netrc
import os
from pathlib import Path

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, WandbLogger


def wandb_mode() -> str:
    """Offline unless an API key is configured; WANDB_MODE, when set, wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class _StepRowsWriter(_ExperimentWriter):
    """Lightning's CSV writer, changed in two ways: the metrics logged at one step (train and
    validation) share one row, and an existing file is continued rather than deleted, so a resumed
    run keeps the rows of the steps before it."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        self._fs = None
        self.rows: dict[int, dict] = {}
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                for row in csv.DictReader(f):
                    self.rows[int(row["step"])] = {k: v for k, v in row.items() if v != ""}
        self.metrics = []
        Path(log_dir).mkdir(parents=True, exist_ok=True)

    def log_metrics(self, metrics_dict: dict, step: int | None = None) -> None:
        step = len(self.rows) if step is None else int(step)
        values = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics_dict.items()}
        self.rows.setdefault(step, {}).update(values, step=step)
        self.metrics.append(values)  # Lightning's CSVLogger saves when this is non-empty

    def save(self) -> None:
        if not self.rows:
            return
        keys = sorted({k for row in self.rows.values() for k in row} - {"step"})
        tmp = self.metrics_file_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", *keys])
            writer.writeheader()
            writer.writerows(self.rows[s] for s in sorted(self.rows))
        os.replace(tmp, self.metrics_file_path)
        self.metrics = []


class RunCSVLogger(CSVLogger):
    """Writes `<run>/metrics.csv` directly in the run folder."""

    def __init__(self, run_dir: str):
        super().__init__(save_dir=run_dir, name="", version="")

    @property
    @rank_zero_experiment
    def experiment(self) -> _StepRowsWriter:
        if self._experiment is None:
            self._experiment = _StepRowsWriter(self.log_dir)
        return self._experiment

    def log_hyperparams(self, params=None) -> None:
        pass  # config.yaml beside it holds them all


class RunWandbLogger(WandbLogger):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # Lightning passes anonymous=None, which this wandb release warns about on every run
        self._wandb_init.pop("anonymous", None)


class _DropNoise(logging.Filter):
    # an advertisement for Lightning's cloud logger; the seed, which config.yaml records, printed on
    # stderr ahead of the checks of the inputs, whose one-line answer must stand alone there
    NOISE = ("litlogger", "Seed set to")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOISE)


def quiet_lightning() -> None:
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.fabric.utilities.seed",
    ):
        logging.getLogger(name).addFilter(_DropNoise())


def make_loggers(run_dir: Path, experiment: str, project: str) -> list:
    os.environ["WANDB_MODE"] = wandb_mode()  # the processes a launcher starts inherit the decision
    return [
        RunCSVLogger(str(run_dir)),
        RunWandbLogger(project=project, name=run_dir.name, group=experiment, save_dir=str(run_dir)),
    ]
