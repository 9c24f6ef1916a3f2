"""The LightningModule: next-token loss, AdamW with weight-decay groups, warm-up then cosine decay."""

from __future__ import annotations

import functools
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from llm import compat
from llm.config import DistillConfig, OptimizerConfig, compute_dtype
from llm.hf import load_pretrained
from llm.model import ModelConfig, Transformer
from llm.observe.metrics import bits_per_byte
from llm.train import distill as kd
from llm.train import float8
from llm.train.clock import StepClock
from llm.train.guards import skip_update_if_nonfinite
from llm.train.optim import WarmupCosine, make_optimizer, param_groups, warmup_cosine
from llm.train.strategy import reinit_partitioned


class LanguageModel(L.LightningModule):
    def __init__(
        self,
        config: ModelConfig = ModelConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        activation_checkpointing: bool = False,
        compile: bool | None = None,
        init: str | None = None,
        float8: Literal["tensorwise", "rowwise"] | None = None,
        float8_emulate: bool = False,
        distill: DistillConfig | None = None,
    ):
        """Args:
        config: the Transformer's architecture (a preset from configs/model/, MODEL=)
        optimizer: AdamW and learning-rate schedule
        activation_checkpointing: recompute each Transformer block in the backward pass (less memory, ~30% more compute)
        compile: torch.compile the Transformer and its loss (null: on with a GPU, off on CPU)
        init: a Hugging Face folder (GPT-2 or Llama family) to start from (INIT=); its architecture replaces config
        float8: train the blocks' linear layers with float8 matmuls (torchao), tensorwise or rowwise scaled;
            a GPU of compute capability 8.9+ (llm/train/float8.py)
        float8_emulate: emulate the float8 matmuls in higher precision, on any device (slow; for tests)
        distill: the top-level --distill section, linked here (llm/train/distill.py)
        """
        super().__init__()
        self.save_hyperparameters()
        self.config, self.optim, self.activation_checkpointing = config, optimizer, activation_checkpointing
        self.compile_model = bool(compile)
        self.init, self.float8, self.float8_emulate = init, float8, float8_emulate
        self.float8_layers: list[str] = []  # the layers float8 converted, once built
        self.distill = distill or DistillConfig()
        # the frozen teacher, in a tuple so that nn.Module does not register it: no optimizer,
        # checkpoint, DDP or DeepSpeed wrapper sees it (llm/train/distill.py)
        self._teacher: tuple[Transformer, ...] = ()
        self.model: Transformer | None = None
        # set after each backward (configure_gradient_clipping): whether this step is skipped, a 0-dim bool
        # tensor on the device; None where DeepSpeed or fp16's grad scaler decide (guards.NonFiniteSteps reads it)
        self.nonfinite: torch.Tensor | None = None
        self.clock = StepClock()  # what the run's callbacks ask whether a batch ended an optimizer step

    def configure_model(self) -> None:
        # built here rather than in __init__ so that DeepSpeed ZeRO-3 can partition it as it is created
        if self.model is not None:
            return
        model = self.model = Transformer(self.config)
        model.activation_checkpointing = self.activation_checkpointing
        # initialise again from a generator of its own, seeded from the run's seed: the weights then
        # depend on the seed alone, not on what building the model drew from the global generator
        # (DeepSpeed's ZeRO-3 builds it differently), so every strategy starts from the same weights
        generator = torch.Generator(self.device).manual_seed(torch.initial_seed())
        init = functools.partial(model._init_weights, generator=generator)
        if any(hasattr(p, "ds_id") for p in model.parameters()):  # partitioned by ZeRO-3 as built
            reinit_partitioned(model, init)
        else:
            model.apply(init)
        if self.init:  # start from a transformers folder's weights (preflight took its architecture)
            model.load_state_dict(load_pretrained(self.init)[1])
        if self.distill.teacher and not self._teacher:
            self._teacher = (kd.load_teacher(self.distill.teacher),)
            if self.distill.init == "teacher_layers":  # a resumed run's checkpoint then replaces them
                kd.init_from_teacher(model, self._teacher[0])
        if self.float8:  # before compile, which fuses float8's casts and scaling into the matmuls
            self.float8_layers = float8.convert(model, self.float8, self.float8_emulate)
        if self.compile_model:
            # in place (nn.Module.compile): the parameter names, and so the checkpoints, stay those of
            # the plain model; compiled lazily, at the first step, after DeepSpeed has set up its hooks
            model.compile()

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        assert self.model is not None, "configure_model builds it"
        return self.model(batch[:, :-1], targets=batch[:, 1:])  # (B, T) inputs and their next tokens

    @property
    def teacher(self) -> Transformer | None:
        """The frozen teacher of a distillation run, or None."""
        return self._teacher[0] if self._teacher else None

    def use_teacher(self, teacher: Transformer) -> None:
        """Distil from this model rather than from distill.teacher's path (make bench builds one)."""
        self._teacher = (teacher.requires_grad_(False).eval(),)

    def teacher_ready(self) -> Transformer:
        """The frozen teacher, on this module's device and in the training precision (moved once)."""
        (teacher,) = self._teacher
        dtype = compute_dtype(self.trainer.precision)  # the teacher's: the one the student computes in
        head = teacher.lm_head.weight
        if head.device != self.device or head.dtype != dtype:
            teacher.to(device=self.device, dtype=dtype)
        return teacher

    def _distill_losses(self, batch: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's CE and its KD term against the teacher, from both models' hidden states."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        teacher = self.teacher_ready()
        with torch.no_grad():
            teacher_hidden = teacher(inputs, hidden=True)
        assert self.model is not None, "configure_model builds it"
        hidden = self.model(inputs, hidden=True)
        heads = (self.model.lm_head.weight, teacher.lm_head.weight)
        return kd.losses(hidden, teacher_hidden, targets, *heads, temperature, self.distill.chunk_tokens)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        alpha = kd.alpha_at(self.distill, self.trainer.global_step, self.trainer.max_steps) if self._teacher else 0.0
        if alpha:
            ce, kd_loss = self._distill_losses(batch, self.distill.temperature)
            loss = (1 - alpha) * ce + alpha * kd_loss
            self.log_dict({"train/ce_loss": ce, "train/kd_loss": kd_loss})
        else:  # no teacher, or past distill.until: the data alone, and the teacher is not run
            loss = self._loss(batch)
            if self._teacher:
                self.log("train/ce_loss", loss)
        # a tensor, kept on the device until a logging step reads it: not prog_bar, which Lightning
        # reads from the device after every batch (the bars read it on logging steps)
        self.log("train/loss", loss)
        if self.logging_step():  # a Python float becomes a tensor on the device: only when it is logged
            self.log("train/lr", self.schedule().get_last_lr()[0])
        return loss

    def logging_step(self) -> bool:
        """Whether the optimizer step under way is one Lightning logs (llm/train/clock.py)."""
        return self.clock.logging_step_under_way(self.trainer)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.clock.batch_start(self.trainer)  # after every callback's, before the forward pass

    def on_validation_epoch_start(self) -> None:
        self._val_losses: list[torch.Tensor] = []
        self._val_kd: list[torch.Tensor] = []

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        if self._teacher:  # the KL to the teacher at temperature 1: how far the two distributions are
            loss, kl = self._distill_losses(batch, 1.0)
            self._val_kd.append(kl.detach())
        else:
            loss = self._loss(batch)
        self._val_losses.append(loss.detach())

    def on_validation_epoch_end(self) -> None:
        # every rank evaluates the same number of blocks, so the mean of rank means is the global mean;
        # logged with sync_dist so that Lightning knows every rank holds that same value
        reduce = self.trainer.strategy.reduce
        loss = reduce(torch.stack(self._val_losses).mean(), reduce_op="mean")
        metrics = {"val/loss": loss, "val/ppl": torch.exp(loss.clamp(max=50.0))}
        if self._val_kd:
            metrics["val/kd"] = reduce(torch.stack(self._val_kd).mean(), reduce_op="mean")
        datamodule = getattr(self.trainer, "datamodule", None)
        val = datamodule.meta["splits"]["val"] if datamodule else None
        if val:
            metrics["val/bpb"] = bits_per_byte(loss, val["tokens"], val["bytes"])
        self.log_dict(metrics, prog_bar=True, sync_dist=True)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's hook after backward, before the update: the global gradient norm is taken
        once, here, and read three ways: `train/grad_norm` on logging steps, the skip of a step whose
        norm is not finite (llm/train/guards.py), and the clipping. DeepSpeed's engine keeps the
        gradients in its own buffers, checks, skips and clips on its own, and reports its norm
        (llm/observe/monitor.py); fp16's grad scaler skips the steps it overflows on itself."""
        self.nonfinite = None
        if isinstance(self.trainer.strategy, DeepSpeedStrategy):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for p in self.parameters() if p.grad is not None]
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros((), device=self.device)
        if self.logging_step():
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:
            self.nonfinite = skip_update_if_nonfinite(optimizer, norm)
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            # clipped here rather than by Lightning's mixed-precision plugin, which refuses any optimizer
            # that can unscale gradients itself (torch's fused AdamW): under bf16 there is no scaler and the
            # gradients are the true ones. A non-finite norm leaves them as they are; the step is skipped
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm.nan_to_num(0.0), foreach=True)
        elif gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        # Lightning's step: the closure runs forward, backward and configure_gradient_clipping, then
        # the optimizer updates; a fused skip's flag lasts for this step only
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            compat.end_fused_skip(optimizer.optimizer)

    def on_train_start(self) -> None:
        # a resumed run may train more (or fewer) steps than the checkpoint's: its schedule, restored
        # with the checkpoint, then ends at the new max_steps
        warmup_cosine = self.schedule().lr_lambdas[0]
        assert isinstance(warmup_cosine, WarmupCosine)
        warmup_cosine.retarget(self.trainer.max_steps, self.trainer.global_step)

    def schedule(self) -> torch.optim.lr_scheduler.LambdaLR:
        """The learning-rate schedule configure_optimizers made (optim.warmup_cosine)."""
        scheduler = self.lr_schedulers()
        assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
        return scheduler

    def configure_optimizers(self):
        o = self.optim
        groups = param_groups(self.model, o.weight_decay)
        optimizer = make_optimizer(groups, o.lr, o.betas, o.eps, self.trainer.strategy, o.fused)
        scheduler = warmup_cosine(optimizer, o.warmup_steps, self.trainer.max_steps, o.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
