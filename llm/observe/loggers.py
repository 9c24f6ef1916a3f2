"""Where metrics go: `metrics.csv` in the run folder (one row per step) and W&B (offline without a key)."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import secrets
import string
import sys
import warnings
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from llm import compat, ranks
from llm.errors import exception_line
from llm.observe.metrics import STEP
from llm.redact import scrub, scrub_name, scrub_text
from llm.wandb_settings import wandb_entity, wandb_mode, wandb_project


def steps_done(lightning_step: int) -> int:
    """The row a metric goes in: optimizer steps done, as the console's `step n/N` counts them.
    Lightning hands its loggers the count before the step just taken (0 for the first)."""
    return int(lightning_step) + 1


class RunCSVLogger(Logger):
    """`<run>/metrics.csv`, one row per optimizer step, numbered from 1 (the row of step n holds
    what was measured when n steps were done): the metrics logged at one step (train and
    validation) share a row, and an existing file is continued rather than replaced, so a resumed
    run keeps the rows of the steps before it. Written on rank zero, whole and atomically, at each
    save (Lightning saves after each logging step)."""

    def __init__(self, run_dir: str):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.csv"
        self.rows: dict[int, dict] | None = None  # read on first use, on rank zero only

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.run_dir)

    @rank_zero_only
    def log_hyperparams(self, params=None, *args, **kwargs) -> None:
        pass  # config.yaml beside it holds them all

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        rows = self._rows()
        step = len(rows) + 1 if step is None else steps_done(step)
        values = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        rows.setdefault(step, {}).update(values, step=step)

    @rank_zero_only
    def save(self) -> None:
        if not self.rows:
            return
        keys = sorted({k for row in self.rows.values() for k in row} - {"step"})
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", *keys])
            writer.writeheader()
            writer.writerows(self.rows[s] for s in sorted(self.rows))
        os.replace(tmp, self.path)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()

    def _rows(self) -> dict[int, dict]:
        if self.rows is None:
            self.rows = {}
            if self.path.is_file():
                with open(self.path, newline="") as f:
                    for row in csv.DictReader(f):
                        self.rows[int(row["step"])] = {k: v for k, v in row.items() if v != ""}
        return self.rows


class _NoExperiment:
    """What the W&B logger hands Lightning once W&B has failed: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class RunWandbLogger(WandbLogger):
    """Lightning's WandbLogger with these changes:
    - the run id is kept in the run folder, so RESUME=auto continues the same W&B run;
    - W&B's config is the run's resolved config and a few derived figures (`run_config`), scrubbed
      of secrets, rather than the module's hyperparameters;
    - the summary keeps the best validation loss (val/loss.min) beside the last, and at the end
      holds summary.json's figures; the run's tokenizer and config are logged as a model artifact;
    - if W&B fails to start or to write, training goes on with metrics.csv, and says so once."""

    def __init__(self, run_dir: Path, **kwargs):
        super().__init__(id=self.run_id(run_dir), resume="allow", save_dir=str(run_dir), **kwargs)
        compat.drop_wandb_anonymous(self)
        self.run_name = kwargs.get("name") or run_dir.name
        self.run_config: dict = {}
        self.failed = False
        self.defined = False

    @staticmethod
    def run_id(run_dir: Path) -> str | None:
        """The W&B run id of this run folder: read, or chosen and written by the first process."""
        path = run_dir / "wandb" / "run_id"
        if path.is_file():
            return path.read_text().strip()
        if not ranks.is_first_process():
            return None  # only rank zero talks to W&B
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's form
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(run_id + "\n")
        except OSError:
            pass  # W&B's own start will fail the same way, and say so
        return run_id

    def _give_up(self, exc: Exception, then: str = "training continues, metrics go to metrics.csv only") -> None:
        if not self.failed:
            self.failed = True
            reason = exception_line(exc, 200) or type(exc).__name__
            print(f"warning: W&B failed ({reason}); {then}", file=sys.stderr)

    @property
    @rank_zero_experiment
    def experiment(self):
        if self.failed:
            return _NoExperiment()
        try:
            argv, sys.argv = sys.argv, [scrub_text(a) for a in sys.argv]  # W&B records the command line
            try:
                experiment = WandbLogger.experiment.fget(self)
            finally:
                sys.argv = argv
            if not self.defined and hasattr(experiment, "define_metric"):
                # Lightning puts every key on its step axis; a key defined by name must say so again
                experiment.define_metric("val/loss", step_metric=STEP, step_sync=True, summary="min,last")
                self.defined = True
            return experiment
        except Exception as exc:  # wandb raises many kinds: bad mode, unwritable dir, network
            self._give_up(exc)
            return _NoExperiment()

    @rank_zero_only
    def log_hyperparams(self, params=None) -> None:
        if self.failed:
            return
        try:
            self.experiment.config.update(scrub(self.run_config), allow_val_change=True)
        except Exception as exc:
            self._give_up(exc)

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        if self.failed:
            return
        try:
            super().log_metrics(metrics, None if step is None else steps_done(step))
        except Exception as exc:
            self._give_up(exc)

    @rank_zero_only
    def record_outcome(self, summary: dict, files: list[Path], weights: Path | None) -> None:
        """summary.json's figures in the run's summary, and an artifact `<run>-model` holding the
        files (tokenizer, config, summary) and, when given, the final checkpoint's weights."""
        if self.failed:
            return
        try:
            import wandb

            experiment = self.experiment
            experiment.summary.update(scrub(summary))
            artifact = wandb.Artifact(f"{self.run_name}-model", type="model", metadata=scrub(summary))
            for path in files:
                artifact.add_file(str(path), name=path.name)
            if weights is not None:
                (artifact.add_dir if weights.is_dir() else artifact.add_file)(str(weights), name=weights.name)
            experiment.log_artifact(artifact, aliases=["latest", f"step-{summary['steps']}"])
        except Exception as exc:
            self._give_up(exc)

    @rank_zero_only
    def finish(self, exit_code: int = 0) -> None:
        """End the W&B run: its files are complete, and a later run in the same process (a notebook,
        a test) starts a run of its own instead of continuing this one."""
        wandb = sys.modules.get("wandb")
        if wandb is None:
            return
        if not self.failed and wandb.run is not None:
            try:
                wandb.run.finish(exit_code=exit_code)
            except Exception as exc:
                self._give_up(exc, "while finishing its run; metrics.csv has every logged row")
        if self.failed:
            # its service process may be gone: a stop signal sent to every process of a SLURM job
            # step reaches it too. W&B's own teardown, left to the exit, would print a traceback
            with contextlib.suppress(Exception, SystemExit):
                wandb.teardown(exit_code)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if not self.failed:
            try:
                super().finalize(status)
            except Exception as exc:
                self._give_up(exc)


class _DropNoise(logging.Filter):
    # an advertisement for Lightning's cloud logger; the seed, which config.yaml records, printed on
    # stderr ahead of the checks of the inputs, whose one-line answer must stand alone there
    NOISE = ("litlogger", "Seed set to")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOISE)


def quiet_lightning() -> None:
    """Leave out what the libraries print that says nothing to a user of this project."""
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.fabric.utilities.seed",
    ):
        logging.getLogger(name).addFilter(_DropNoise())
    # lightning 2.6 calls a torch pytree API that torch 2.13 deprecates; nothing for a user to do
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # LanguageModel.configure_gradient_clipping clips under bf16 autocast only and defers to Lightning
    # otherwise; under DeepSpeed the engine clips, at trainer.gradient_clip_val, as Lightning sets it
    warnings.filterwarnings("ignore", message=r"Since DeepSpeed handles gradient clipping internally")
    # a machine with SLURM's commands, where a run outside a job is what was asked (make slurm submits one)
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")
    # torch 2.13 deprecates collectives that DeepSpeed (ZeRO's gathers) and Lightning (all_gather,
    # for the memory of every rank) still call: each says so once per process, and nothing in this
    # project calls them; the libraries' next releases move
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")


def make_loggers(
    run_dir: Path, experiment: str, project: str | None, entity: str | None = None, tags: list[str] | None = None
) -> list:
    """metrics.csv and W&B: the run is named after its folder, grouped by experiment, job_type
    train, tagged (`run_tags`)."""
    os.environ["WANDB_MODE"] = wandb_mode()  # the processes a launcher starts inherit the decision
    if os.environ["WANDB_MODE"] == "disabled":  # W&B left out: not even imported
        return [RunCSVLogger(str(run_dir))]
    wandb = RunWandbLogger(
        run_dir,
        project=wandb_project(project),
        entity=wandb_entity(entity),
        name=scrub_name(run_dir.name),
        group=scrub_name(experiment),
        job_type="train",
        tags=tags or [],
    )
    return [RunCSVLogger(str(run_dir)), wandb]
