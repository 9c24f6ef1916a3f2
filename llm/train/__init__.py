"""A training run: the LightningCLI entry point (`cli`), the LightningModule (`module`) and its step
clock (`clock`), the optimizer and schedule (`optim`), float8 training (`float8`), distillation's
loss and teacher (`distill`), the distribution strategy (`strategy`), non-finite steps (`guards`)
and the callbacks a run uses, in order (`callbacks`)."""
