"""LightningCLI entry: `python -m llm fit|prepare` with composable YAML configs and overrides.

The order of work is the point of this file: parse, check every input (one line per bad input,
before anything expensive), prepare the data (cached), create the run folder, then train and
write `summary.json`.
"""

from __future__ import annotations

import sys
import time
import warnings

import torch
import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from llm import preflight, run
from llm.data.datamodule import TokenDataModule
from llm.errors import OneLineErrors
from llm.loggers import make_loggers, quiet_lightning
from llm.model import count_params
from llm.module import LanguageModel


class ArgumentParser(OneLineErrors, LightningArgumentParser):
    """LightningCLI's parser, answering a bad argument with one line."""


class LLMCLI(LightningCLI):
    def __init__(self, *args, prepare_only: bool = False, **kwargs):
        self.prepare_only = prepare_only
        super().__init__(
            LanguageModel,
            TokenDataModule,
            *args,
            parser_class=ArgumentParser,
            save_config_kwargs={"overwrite": True},  # a resumed run rewrites config.yaml with its own config
            load_from_checkpoint_support=False,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--experiment", type=str, default="default", help="experiment name: run folder prefix, W&B group"
        )
        parser.add_argument(
            "--run", type=str | None, default=None, help="run folder (RUN=); default runs/<experiment>-<time>"
        )
        parser.add_argument(
            "--resume",
            type=str | None,
            default=None,
            help="auto: continue from the latest complete checkpoint in --run, if any; or a checkpoint path",
        )
        parser.add_argument(
            "--eval_every", type=int, default=100, help="validate and checkpoint every this many optimizer steps"
        )
        parser.add_argument("--wandb_project", type=str, default="llm", help="W&B project")
        parser.link_arguments("model.config.block_size", "data.block_size")
        parser.link_arguments(
            ("eval_every", "trainer.accumulate_grad_batches"),
            "trainer.val_check_interval",
            compute_fn=lambda every, accumulate: every * (accumulate or 1),
        )
        # the datamodule shards by rank itself; validation counts batches over the whole run, not per epoch
        parser.set_defaults({"trainer.use_distributed_sampler": False, "trainer.check_val_every_n_epoch": None})

    def _config(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._config()
        preflight.check(cfg, self.subcommand or "prepare")
        if self.prepare_only:
            return
        self.data_folder = preflight.prepare_data(cfg)
        self.run_dir = run.create(cfg)
        cfg.trainer.default_root_dir = str(self.run_dir)

    def instantiate_classes(self) -> None:
        if not self.prepare_only:
            super().instantiate_classes()

    def instantiate_trainer(self, **kwargs):
        cfg = self._config()
        callbacks = list(self._get(self.config_init, "trainer", default={}).get("callbacks") or [])
        resolved = yaml.safe_load(self._parser(self.subcommand).dump(cfg, skip_check=True))
        callbacks += run.callbacks(resolved, self.run_dir, self.data_folder)
        loggers = make_loggers(self.run_dir, cfg.experiment, cfg.wandb_project)
        return super().instantiate_trainer(logger=loggers, callbacks=callbacks, **kwargs)

    def fit(self, model, datamodule, **kwargs) -> None:
        cfg = self._config()
        ckpt_path = run.resume_checkpoint(cfg.resume, self.run_dir)
        c = model.config
        block, batch, accumulate = c.block_size, datamodule.batch_size, self.trainer.accumulate_grad_batches
        print(f"model: {count_params(c):,} parameters, {c.n_layer} layers, {c.n_embd} wide, vocab {c.vocab_size}")
        print(
            f"tokens per step: {accumulate * batch * block * self.trainer.world_size:,} "
            f"({accumulate} x {batch} x {block} tokens x {self.trainer.world_size} processes); run: {self.run_dir}"
        )
        started = time.perf_counter()
        self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        run.write_summary(self.trainer, datamodule, model, time.perf_counter() - started)


def prepare_main() -> None:
    """`python -m llm prepare`: the data section of the same configs, prepared and cached."""
    sys.argv = [sys.argv[0], *sys.argv[2:]]  # LightningCLI without subcommands parses what follows
    quiet_lightning()
    cli = LLMCLI(run=False, prepare_only=True)
    preflight.prepare_data(cli.config)


def fit_main() -> None:
    """`python -m llm fit`: parses sys.argv as it is, so that Lightning's launcher can rerun it as
    it is in the processes it starts."""
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them; no effect on CPU
    quiet_lightning()
    # lightning 2.6 calls a torch pytree API that torch 2.13 deprecates; nothing for a user to do
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    LLMCLI()
