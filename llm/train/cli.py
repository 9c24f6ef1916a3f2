"""LightningCLI entry: `python -m llm fit|prepare` with composable YAML configs and overrides.

The order of work is the point of this file: parse, check every input (one line per bad input,
before anything expensive), prepare the data (cached), create the run folder, then train and
write `summary.json`.
"""

from __future__ import annotations

import contextlib
import sys
import time
import typing
from dataclasses import asdict, fields
from pathlib import Path

import torch
import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment

from llm import atomic, handoff, ranks
from llm.checkpointing import resume, run_folder, universal
from llm.checkpointing.files import Checkpoint, CheckpointFolder, content_digest, weights_only_loads
from llm.checkpointing.saving import Checkpoints
from llm.config import DistillConfig, RunConfig, RunOptions, datamodule_args
from llm.data.datamodule import TokenDataModule
from llm.data.prepare import load_meta
from llm.errors import ConfigError, OneLineErrors
from llm.launch import agreement
from llm.model import count_params, flops_per_token
from llm.observe.loggers import RunWandbLogger, make_loggers, quiet_lightning
from llm.observe.monitor import PerformanceMonitor, tokens_per_optimizer_step
from llm.observe.summary import strategy_label, write_summary
from llm.preflight import resolve, teacher
from llm.redact import scrub
from llm.train import in_loop_eval
from llm.train.callbacks import RunInfo, run_callbacks
from llm.train.module import LanguageModel
from llm.train.strategy import build_strategy


class ArgumentParser(OneLineErrors, LightningArgumentParser):
    """LightningCLI's parser, answering a bad argument with one line."""


def option_help(cls) -> dict[str, str]:
    """The help of each field of a dataclass, from its docstring's Args (as jsonargparse reads them)."""
    from docstring_parser import parse

    return {p.arg_name: " ".join((p.description or "").split()) for p in parse(cls.__doc__ or "").params}


class LLMCLI(LightningCLI):
    def __init__(self, prepare_only: bool = False, **kwargs):
        self.prepare_only = prepare_only
        super().__init__(
            LanguageModel,
            TokenDataModule,  # or a subclass, named by data.class_path (--data=<class>): docs/extending.md
            subclass_mode_data=True,
            parser_class=ArgumentParser,
            save_config_callback=None,  # config.yaml is written once the config is resolved (instantiate_trainer)
            load_from_checkpoint_support=False,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # the run's own options, beside LightningCLI's sections: their types, defaults and help are
        # RunOptions' (llm/config.py), so that a field added there is an option
        types, helps = typing.get_type_hints(RunOptions), option_help(RunOptions)
        for option in fields(RunOptions):
            if option.name != "seed_everything":  # LightningCLI's own
                help = helps[option.name]
                parser.add_argument(f"--{option.name}", type=types[option.name], default=option.default, help=help)
        # distillation's own section (make distill TEACHER=), which the model receives
        parser.add_argument("--distill", type=DistillConfig, default=DistillConfig(), help="knowledge distillation")
        parser.link_arguments("distill", "model.distill")
        # the data section may be written flat (the TokenDataModule's arguments): that class is the default
        parser.set_defaults({"data": {"class_path": f"{TokenDataModule.__module__}.{TokenDataModule.__name__}"}})
        parser.link_arguments("model.config.block_size", "data.init_args.block_size")
        # the datamodule shards by rank itself; validation counts batches over the whole run, not per epoch
        parser.set_defaults({"trainer.use_distributed_sampler": False, "trainer.check_val_every_n_epoch": None})

    def _config(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        # the parsed command line is read here, once: the run is built from what resolve returns
        cfg = self._config()
        parsed = cfg.as_dict()
        if self.prepare_only:
            self.run_config = resolve.resolve(parsed, "prepare")
            resolve.check(self.run_config, "prepare")
            return
        self.model_preset = model_preset(parsed)
        self.given_strategy, logger = cfg.trainer.strategy, cfg.trainer.logger
        # with an outside launcher every process is here at once: rank 0 decides the run folder and
        # whether the inputs only it checks are acceptable; the others take its word (llm/launch/agreement.py)
        self.agreement = agreement.Agreement.start()
        try:
            sizes = None
            if not self.agreement.leader:
                parsed["run"], sizes = self.agreement.wait("run"), self.agreement.wait("sizes")
            command = self.subcommand or "fit"
            run = self.run_config = resolve.resolve(parsed, command, sizes)  # what the parts are built from
            resolve.check(run, command, logger)
            in_loop_eval.check(run.options)
            self.agreement.publish("sizes", {"deepspeed": run.options.deepspeed, "batch_size": run.loader.batch_size})
            self.agreement.publish("run", run.options.run)
            self.resume_from = self.choose_resume(run)
            self.data_folder = resolve.prepare_data(run)
            self.agreement.publish("ready", True)
            self.agreement.wait("ready")
        except ConfigError as exc:
            self.agreement.refuse(str(exc))
            raise
        self.run_dir = run_folder.create(run.options)
        build_from(cfg, run, self.run_dir)

    def choose_resume(self, run: RunConfig) -> str | None:
        """The checkpoint every rank continues from, chosen once by rank 0 and checked against the
        config before any expensive work; the others take it from rank 0."""
        if not self.agreement.leader:
            if self.agreement.store is None:  # started by Lightning's launcher, after rank 0 chose
                return handoff.received(handoff.RESUME_FROM) or None
            return self.agreement.wait("resume")
        path = resume.resume_checkpoint(run.options.resume, run.folder)
        if path and resume.check_resume(run, path):  # a DeepSpeed checkpoint, on another number of processes
            path = str(universal.convert(Checkpoint(path, field="resume"), run.world_size or 1))
        handoff.hand_on(handoff.RESUME_FROM, path or "")
        self.agreement.publish("resume", path)
        return path

    def instantiate_classes(self) -> None:
        if not self.prepare_only:
            super().instantiate_classes()

    def instantiate_trainer(self, **kwargs):
        trainer_init = self.config_init.get(f"{self.subcommand}.trainer") or {}  # the YAML's, instantiated
        callbacks = list(trainer_init.get("callbacks") or [])
        # the resolved config, once, without secrets: config.yaml, every checkpoint and W&B's run config
        whole = yaml.safe_load(self.parser.dump(self.config, skip_unset=False, skip_validation=True))
        run, resolved = self.run_config, scrub(whole[self.subcommand])
        if ranks.is_first_process():  # a resumed run rewrites it with its own config
            write_config_file(self.run_dir / "config.yaml", resolved)
        model, options = run.model, run.options
        flops = flops_per_token(model, model.block_size)
        if run.distill.teacher:  # and the teacher's forward pass, a third of its training FLOPs
            flops += flops_per_token(teacher.teacher_config(run.distill.teacher), model.block_size) // 3
        self.monitor = PerformanceMonitor(flops, options.peak_flops)
        every = options.save_every or options.eval_every
        folder = CheckpointFolder(self.run_dir / "checkpoints")
        self.checkpoints = Checkpoints(folder, every, options.keep_last, options.save_every_minutes)
        digest = content_digest(run.distill.teacher, teacher.FIELD) if run.distill.teacher else None
        self.run_info = RunInfo(resolved, self.data_folder, self.resume_from, digest)
        callbacks += run_callbacks(self.monitor, self.checkpoints, self.run_info, options, self.run_dir)
        loggers = make_loggers(
            self.run_dir,
            options.experiment,
            options.wandb_project,
            options.wandb_entity,
            run_tags(run, self.model_preset),
        )
        loggers += resolve.extra_loggers(trainer_init.get("logger"))
        strategy = build_strategy(
            options.deepspeed,
            options.nvme_path,
            run.loader.batch_size,
            resolve.uses_gpu(run.trainer),
            run.world_size,
            options.collective_timeout,
            load_universal=universal.is_universal(self.resume_from),
            precision=str(run.trainer.precision),
            compiled=bool(run.compile),
        )
        if strategy == "auto" or (self.given_strategy not in ("auto", "ddp") and not options.deepspeed):
            strategy = self.given_strategy
        if ranks.slurm_job_id():
            # SIGUSR1 saves at a step boundary and requeues through Checkpoints: not Lightning's own
            # requeue, which would save in the middle of a step
            kwargs["plugins"] = [*(kwargs.get("plugins") or []), SLURMEnvironment(auto_requeue=False)]
        # Lightning counts validation's interval in micro-batches: eval_every optimizer steps' worth (given
        # here, not in the config, so that config.yaml holds eval_every alone and a resume on another
        # accumulation validates at the same steps)
        kwargs["val_check_interval"] = options.eval_every * run.trainer.accumulate_grad_batches
        return super().instantiate_trainer(logger=loggers, callbacks=callbacks, strategy=strategy, **kwargs)

    def fit(self, model, datamodule, **kwargs) -> None:
        ckpt_path = self.resume_from
        if ranks.is_first_process():
            self.print_header(model.config, datamodule)
        for logger in self.trainer.loggers:
            if isinstance(logger, RunWandbLogger):
                logger.run_config = self.wandb_config(model.config, self.run_info.config)
        started = time.perf_counter()
        wandb_loggers = [logger for logger in self.trainer.loggers if isinstance(logger, RunWandbLogger)]
        try:
            # a checkpoint is read as tensors and plain data only, DeepSpeed's shards included
            with weights_only_loads() if ckpt_path else contextlib.nullcontext():
                self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
                if ckpt_path and "val/loss" not in self.trainer.callback_metrics:
                    # resumed at the last step (a stop during the final validation): nothing trained
                    # and nothing validated; the final validation, then the summary
                    self.trainer.validate(model, datamodule=datamodule, verbose=False)
        except BaseException:
            for logger in wandb_loggers:
                logger.finish(exit_code=1)
            raise
        seconds = time.perf_counter() - started
        summary = write_summary(self.trainer, datamodule, model, seconds, self.checkpoints, self.run_info, self.monitor)
        files = [self.run_dir / "config.yaml", self.run_dir / "summary.json", datamodule.folder / "tokenizer.json"]
        last = summary["last_checkpoint"]
        weights = Path(last).resolve() if self.run_config.options.wandb_log_model and last else None
        for logger in wandb_loggers:
            logger.record_outcome(summary, [f for f in files if f.is_file()], weights)
            logger.finish(exit_code=0)

    def wandb_config(self, model_config, resolved: dict) -> dict:
        """What W&B's run config holds: the resolved config and the figures a dashboard needs."""
        return {
            **resolved,
            "params": count_params(model_config),
            "flops_per_token": flops_per_token(model_config, model_config.block_size),
            "world_size": self.trainer.world_size,
            "strategy": strategy_label(self.trainer.strategy),
            "model_preset": self.model_preset,
        }

    def print_header(self, c, datamodule) -> None:
        """What the run will do, in numbers, before it starts (as nanoGPT prints them)."""
        accumulate, world = self.trainer.accumulate_grad_batches, self.trainer.world_size
        print(f"model: {count_params(c):,} parameters, {c.n_layer} layers, {c.n_embd} wide, vocab {c.vocab_size}")
        meta = load_meta(self.data_folder)
        tokens = ", ".join(f"{split} {info['tokens']:,}" for split, info in meta["splits"].items())
        # the file this run was given: the cache is keyed by content, so meta.json names the path of
        # whichever run prepared it first
        given = self.run_config.data.tokenizer
        source = given or f"byte-level BPE trained on the train split ({self.data_folder / meta['tokenizer']})"
        print(f"data: {self.data_folder} ({tokens} tokens)")
        print(f"tokenizer: {source}; vocabulary {meta['vocab_size']:,}, {meta['eot_token']} = {meta['eot_id']}")
        print(
            f"tokens per step: {tokens_per_optimizer_step(self.trainer, datamodule):,} "
            f"({accumulate} x {datamodule.batch_size} x {datamodule.block_size} tokens x {world} processes"
            f"{', the accumulation derived from tokens_per_step' if self.run_config.options.tokens_per_step else ''}); "
            f"strategy: {strategy_label(self.trainer.strategy)}; "
            f"compile: {'on' if self.model.compile_model else 'off'}; "
            f"float8: {self.model.float8 or 'off'}{' (emulated)' if self.model.float8_emulate else ''}; "
            f"run: {self.run_dir}"
        )
        d = self.model.distill
        if d.teacher:
            shape = teacher.teacher_config(d.teacher)
            print(
                f"distilling from {d.teacher}: {count_params(shape):,} parameters, {shape.n_layer} layers, "
                f"{shape.n_embd} wide; alpha {d.alpha}, temperature {d.temperature}, until {d.until:g} of the steps"
                + ("; student blocks from the teacher's" if d.init else "")
            )


def write_config_file(path: Path, resolved: dict) -> None:
    atomic.write_text(path, yaml.safe_dump(resolved, sort_keys=False))  # a full disk leaves the old one


def build_from(cfg, run: RunConfig, run_dir: Path) -> None:
    """The resolved config written into the parsed namespace that LightningCLI builds the model, the
    data module and the trainer from: every field of `run` (one way, once), and the trainer settings
    derived from it. What the namespace holds besides (a data module subclass's own arguments, Lightning's
    other trainer settings) is the user's, as given."""
    for option in fields(RunOptions):
        cfg[option.name] = getattr(run.options, option.name)
    model = cfg.model
    for name, value in asdict(run.model).items():
        model.config[name] = value
    for name, value in asdict(run.optimizer).items():
        model.optimizer[name] = value
    model.compile, model.activation_checkpointing = run.compile, run.activation_checkpointing
    model.init, model.float8, model.float8_emulate = run.init, run.float8, run.float8_emulate
    data = datamodule_args(cfg.data)
    for section in (run.data, run.loader):
        for name, value in asdict(section).items():
            if name in data:  # a data module subclass may take fewer
                data[name] = value
    for name, value in asdict(run.trainer).items():
        cfg.trainer[name] = value
    if run.float8:  # float8's tensor subclasses under Lightning's inference_mode: validate under no_grad
        cfg.trainer.inference_mode = False
    cfg.trainer.default_root_dir = str(run_dir)


def model_preset(parsed: dict) -> str:
    """The name of the model preset the config used (configs/model/<name>.yaml), or "custom"."""
    path = parsed["model"]["config"].get("__path__")
    return Path(str(path)).stem if path else "custom"


def run_tags(run: RunConfig, preset: str) -> list[str]:
    """W&B tags: what a run list is filtered by."""
    ds = Path(run.options.deepspeed).stem if run.options.deepspeed else "none"
    return [
        f"model:{preset}",
        f"ds:{ds}",
        f"precision:{run.trainer.precision}",  # filled in by resolve.resolve
        f"world:{run.world_size}",
    ]


def prepare_main() -> None:
    """`python -m llm prepare`: the data section of the same configs, prepared and cached."""
    sys.argv = [sys.argv[0], *sys.argv[2:]]  # LightningCLI without subcommands parses what follows
    quiet_lightning()
    cli = LLMCLI(run=False, prepare_only=True)
    resolve.prepare_data(cli.run_config)


def fit_main() -> None:
    """`python -m llm fit`: parses sys.argv as it is, so that Lightning's launcher can rerun it as
    it is in the processes it starts."""
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them; no effect on CPU
    quiet_lightning()
    try:
        LLMCLI()
    finally:
        run_folder.release_writer()  # a process's end releases it too; this is for a fit called in-process
