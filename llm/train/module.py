"""The LightningModule: next-token loss, AdamW with weight-decay groups, warm-up then cosine decay."""

from __future__ import annotations

import functools

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from llm.config import OptimizerConfig
from llm.hf import load_pretrained
from llm.metrics import bits_per_byte
from llm.model import ModelConfig, Transformer
from llm.train.guards import skip_nonfinite_steps
from llm.train.optim import make_optimizer, param_groups, warmup_cosine
from llm.train.strategy import reinit_partitioned


class LanguageModel(L.LightningModule):
    def __init__(
        self,
        config: ModelConfig = ModelConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        activation_checkpointing: bool = False,
        compile: bool | None = None,
        init: str | None = None,
    ):
        """Args:
        config: the Transformer's architecture (a preset from configs/model/, MODEL=)
        optimizer: AdamW and learning-rate schedule
        activation_checkpointing: recompute each Transformer block in the backward pass (less memory, ~30% more compute)
        compile: torch.compile the Transformer and its loss (null: on with a GPU, off on CPU)
        init: a Hugging Face folder (GPT-2 or Llama family) to start from (INIT=); its architecture replaces config
        """
        super().__init__()
        self.save_hyperparameters()
        self.config, self.optim, self.activation_checkpointing = config, optimizer, activation_checkpointing
        self.compile_model = bool(compile)
        self.init = init
        self.model: Transformer | None = None

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
        if self.compile_model:
            # in place (nn.Module.compile): the parameter names, and so the checkpoints, stay those of
            # the plain model; compiled lazily, at the first step, after DeepSpeed has set up its hooks
            model.compile()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch[:, :-1], targets=batch[:, 1:])  # (B, T) inputs and their next tokens

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_losses: list[torch.Tensor] = []

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._val_losses.append(self._loss(batch).detach())

    def on_validation_epoch_end(self) -> None:
        # every rank evaluates the same number of blocks, so the mean of rank means is the global mean;
        # logged with sync_dist so that Lightning knows every rank holds that same value
        loss = self.trainer.strategy.reduce(torch.stack(self._val_losses).mean(), reduce_op="mean")
        metrics = {"val/loss": loss, "val/ppl": torch.exp(loss.clamp(max=50.0))}
        val = self.trainer.datamodule.meta["splits"]["val"] if self.trainer.datamodule else None
        if val:
            metrics["val/bpb"] = bits_per_byte(loss, val["tokens"], val["bytes"])
        self.log_dict(metrics, prog_bar=True, sync_dist=True)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Runs after backward, before the optimizer step: the global gradient norm decides whether
        the step is taken (llm/train/guards.py), then clips. DeepSpeed's engine and the fp16 grad scaler
        check and skip on their own, and clip or unscale as Lightning arranges."""
        precision = self.trainer.precision_plugin
        self.nonfinite = None
        if isinstance(self.trainer.strategy, DeepSpeedStrategy) or getattr(precision, "scaler", None) is not None:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for p in self.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros((), device=self.device)
        self.nonfinite = ~torch.isfinite(norm)
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            # clipped here rather than by Lightning's mixed-precision plugin, which refuses any optimizer
            # that can unscale gradients itself (torch's fused AdamW): under bf16 there is no scaler and the
            # gradients are the true ones. A non-finite norm leaves them as they are; the step is skipped
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm.nan_to_num(0.0), foreach=True)
        elif gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # a resumed run may train more steps than the checkpoint's: its cosine then decays to the
        # minimum at the new max_steps, from the learning rate it has reached (torch's cosine is
        # computed step by step from the current rate), instead of rising again past the old end
        for state in checkpoint.get("lr_schedulers", []):
            if "_schedulers" in state:
                cosine, warmup_steps = state["_schedulers"][-1], state["_milestones"][0]
                cosine["T_max"] = max(1, self.trainer.max_steps - warmup_steps)

    def configure_optimizers(self):
        o = self.optim
        groups = param_groups(self.model, o.weight_decay)
        optimizer = make_optimizer(groups, o.lr, o.betas, o.eps, self.trainer.strategy, o.fused)
        skip_nonfinite_steps(optimizer, self)
        scheduler = warmup_cosine(optimizer, o.warmup_steps, self.trainer.max_steps, o.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
