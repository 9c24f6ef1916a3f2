"""llm/compat.py holds what the project takes from library internals; these tests fail when a
library version changes what those internals do."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from llm import compat


def test_every_process_group_gets_the_timeout_including_groups_made_later(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, timeout=timedelta(seconds=50)
    )
    try:
        dist.new_group([0])  # as DeepSpeed does for its copy of the world group
        before = compat.process_group_timeouts()
        # one entry per group and device type; the group made later has torch's default, not 50 s
        assert set(before) == {timedelta(seconds=50), timedelta(minutes=30)}

        compat.set_timeout_of_every_process_group(timedelta(seconds=7))

        after = compat.process_group_timeouts()
        assert len(after) == len(before) and set(after) == {timedelta(seconds=7)}
    finally:
        dist.destroy_process_group()


def test_fused_adamw_leaves_everything_unchanged_while_found_inf_is_set():
    # guards.skip_update_if_nonfinite hands a non-finite gradient norm to torch's fused AdamW as a grad
    # scaler does; if torch stops reading the attribute, a NaN step would write NaN into the weights
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    weight.grad = torch.ones(4, 4)
    optimizer.step()  # one real step: moments and a step count exist
    before = weight.detach().clone(), {k: v.clone() for k, v in optimizer.state[weight].items()}

    weight.grad = torch.full((4, 4), float("nan"))
    compat.skip_fused_update_if(optimizer, torch.tensor(True))
    optimizer.step()
    compat.end_fused_skip(optimizer)
    assert torch.equal(weight.detach(), before[0])
    for key, value in optimizer.state[weight].items():
        assert torch.equal(value, before[1][key]), key

    weight.grad = torch.ones(4, 4)
    compat.skip_fused_update_if(optimizer, torch.tensor(False))
    optimizer.step()
    compat.end_fused_skip(optimizer)
    assert not torch.equal(weight.detach(), before[0]) and not hasattr(optimizer, "found_inf")


def test_wandb_logger_still_hands_wandb_anonymous_and_the_patch_removes_it(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    assert "anonymous" in logger._wandb_init  # once Lightning stops, compat.drop_wandb_anonymous can go
    compat.drop_wandb_anonymous(logger)
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["dir"] == str(tmp_path)


def test_the_step_lightning_logs_under_is_the_one_set(tmp_path):
    # callbacks.LoggingStepOnResume sets it after a resume; if Lightning logged under another counter,
    # a resumed run's metrics.csv would skip or overwrite a row
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from llm.observe.loggers import RunCSVLogger

    class Jump(L.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            if trainer.global_step == 2:
                compat.set_logging_step(trainer, 100)

    class Logged(BoringModel):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            self.log("x", float(batch_idx))
            return out

    trainer = L.Trainer(
        max_steps=4, logger=RunCSVLogger(str(tmp_path)), callbacks=[Jump()], log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(Logged())
    steps = [int(line.split(",")[0]) for line in (tmp_path / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 101, 102]  # steps done: Lightning's count, set to 100 after two steps, plus one


def test_a_shifted_batch_count_moves_the_validations_of_a_resumed_run(tmp_path):
    # callbacks.RunInfo shifts it when a run resumes with another accumulation: 4 steps of 1
    # micro-batch, validating every 4 micro-batches, continue with 2 per step, every 8 (every 4 steps)
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    class Validated(BoringModel):
        steps: list[int] = []

        def on_validation_epoch_end(self) -> None:
            if not self.trainer.sanity_checking:
                self.steps.append(self.trainer.global_step)

    class Shift(L.Callback):
        def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
            compat.shift_batch_progress(checkpoint, checkpoint["global_step"] * (2 - 1))

    def trainer(max_steps, accumulate, callbacks=()):
        return L.Trainer(
            max_steps=max_steps, accumulate_grad_batches=accumulate, val_check_interval=4 * accumulate,
            limit_val_batches=1, num_sanity_val_steps=0, callbacks=list(callbacks), logger=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
            accelerator="cpu", devices=1,
        )  # fmt: skip

    first = trainer(4, 1)
    first.fit(Validated())
    first.save_checkpoint(tmp_path / "step-4.ckpt")
    for callbacks, expected in (((), [6]), ((Shift(),), [8])):  # unshifted: at step 6, 2 steps early
        Validated.steps = []
        trainer(8, 2, callbacks).fit(Validated(), ckpt_path=tmp_path / "step-4.ckpt")
        assert Validated.steps == expected


def test_the_private_lightning_methods_the_strategy_and_progress_bar_override_still_exist():
    # train/strategy.py's CPUDeepSpeedStrategy and train/progress.py's RichBar override these (Lightning
    # 2.6); a rename would leave the overrides unused and ZeRO on CPU or the bar's cadence broken
    import inspect

    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.strategies import DeepSpeedStrategy

    assert list(inspect.signature(DeepSpeedStrategy._setup_model_and_optimizer).parameters)[:4] == [
        "self", "model", "optimizer", "lr_scheduler",
    ]  # fmt: skip
    assert callable(DeepSpeedStrategy._init_deepspeed_distributed)
    assert callable(RichProgressBar._get_train_description)


def test_torchao_imports_without_its_notices_once_quieted():
    # torchao 0.18 on a CPU-only torch 2.13 warns of each GPU kernel library it cannot load ("Failed to
    # load"), and torch of each enum torchao registers the old way ("is an Enum subclass"); if either
    # library logs them under another logger, they come back here
    import subprocess
    import sys

    code = "from llm import compat; compat.quiet_torchao(); import torchao.quantization, torchao.float8"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Failed to load" not in done.stderr and "is an Enum subclass" not in done.stderr, done.stderr


def test_compile_callbacks_run_at_the_start_and_end_of_a_compilation():
    # monitor.CompileClock times compilations by them; if torch stops calling them, compile time counts as training
    events = []
    torch._dynamo.reset()  # a fresh cache, so that the function below compiles (it also drops registered callbacks)
    handler = compat.compile_callbacks()

    def start(_args):
        events.append("start")

    def end(_args):
        events.append("end")

    handler.register_start_callback(start)
    handler.register_end_callback(end)
    try:
        compiled = torch.compile(lambda x: x * 2 + 1, backend="eager")
        assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 3.0))
    finally:
        handler.remove_start_callback(start)
        handler.remove_end_callback(end)
    assert events[:2] == ["start", "end"], events


def test_torchaos_float8_filter_takes_large_layers_and_leaves_the_named_and_small_ones():
    compat.quiet_torchao()
    chosen = compat.float8_layer_filter("tensorwise", ["lm_head"])
    with torch.device("meta"):
        large, small = torch.nn.Linear(4096, 4096), torch.nn.Linear(64, 64)
    assert chosen(large, "blocks.0.mlp.up_proj") and not chosen(small, "blocks.0.mlp.up_proj")
    assert not chosen(large, "lm_head")


def test_ds_to_universal_takes_the_arguments_the_conversion_gives_it(monkeypatch):
    # convert_to_universal builds the namespace DeepSpeed's own command line parses: the same names
    import argparse
    import sys

    from deepspeed.checkpoint import ds_to_universal

    monkeypatch.setattr(sys, "argv", ["ds_to_universal", "--input_folder=a", "--output_folder=b"])
    parsed = vars(ds_to_universal.parse_arguments())
    given = {}
    monkeypatch.setattr(ds_to_universal, "main", lambda args: given.update(vars(args)))
    compat.convert_to_universal("a", "b")
    assert set(given) == set(parsed), (sorted(given), sorted(parsed))
    assert isinstance(argparse.Namespace(**given), argparse.Namespace)


@pytest.mark.slow  # reads the shards of the 2-process ZeRO-2 run
def test_every_class_deepspeed_pickles_into_its_optimizer_shards_is_allowed(runs):
    """A weights-only load of a real ZeRO-2 checkpoint's optimizer shards: a class DeepSpeed adds to
    them, or moves, is refused by torch here before any checkpoint of a user is."""
    compat.allow_deepspeed_types()
    shards = sorted((runs("zero2") / "checkpoints" / "last.ckpt").resolve().rglob("*optim_states.pt"))
    assert len(shards) == 2
    for shard in shards:
        state = torch.load(shard, map_location="cpu", weights_only=True)
        assert "optimizer_state_dict" in state
