"""The LightningModule: next-token loss, AdamW with weight-decay groups, warm-up then cosine decay."""

from __future__ import annotations

from dataclasses import dataclass, field

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from llm.model import ModelConfig, Transformer


@dataclass
class OptimizerConfig:
    lr: float = 3e-4  # peak learning rate, reached at the end of warm-up
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only; norms, biases and embeddings are not decayed
    betas: tuple[float, float] = field(default=(0.9, 0.95))
    eps: float = 1e-8


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight matrices decay; norms, biases and embeddings do not."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # yields a tied matrix once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Linear warm-up from lr/warmup to lr, then cosine decay to lr * min_lr_ratio at total_steps."""
    warmup_steps = max(1, min(warmup_steps, total_steps - 1))
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup_steps, total_iters=warmup_steps)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=optimizer.defaults["lr"] * min_lr_ratio
    )
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


# checkpoints hold these dataclasses among the hyperparameters; resuming loads them with
# torch.load(weights_only=True), which accepts only the types allowed here
torch.serialization.add_safe_globals([ModelConfig, OptimizerConfig])


class LanguageModel(L.LightningModule):
    def __init__(
        self,
        config: ModelConfig = ModelConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        activation_checkpointing: bool = False,
    ):
        """Args:
        config: the Transformer's architecture (a preset from configs/model/, MODEL=)
        optimizer: AdamW and learning-rate schedule
        activation_checkpointing: recompute each Transformer block in the backward pass (less memory, ~30% more compute)
        """
        super().__init__()
        self.save_hyperparameters()
        self.config, self.optim, self.activation_checkpointing = config, optimizer, activation_checkpointing
        self.model: Transformer | None = None

    def configure_model(self) -> None:
        # built here rather than in __init__ so that DeepSpeed ZeRO-3 can partition it as it is created
        if self.model is None:
            self.model = Transformer(self.config)
            self.model.activation_checkpointing = self.activation_checkpointing

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        x, y = batch[:, :-1], batch[:, 1:]  # (B, T) inputs and their next tokens
        logits = self.model(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

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
        # every rank evaluates the same number of blocks, so the mean of rank means is the global mean
        loss = self.all_gather(torch.stack(self._val_losses).mean()).mean()
        self.log_dict({"val/loss": loss, "val/ppl": torch.exp(loss.clamp(max=50.0))}, prog_bar=True)

    def configure_optimizers(self):
        o = self.optim
        optimizer = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
        scheduler = warmup_cosine(optimizer, o.warmup_steps, self.trainer.max_steps, o.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
