"""Callbacks that tests pass to the real entry point with --trainer.callbacks, and the objects that
act when pickled or unpickled."""

from pathlib import Path

from lightning.pytorch.callbacks import Callback


class StopAtStep(Callback):
    """Stop a run after `step` optimizer steps, as a preempted job would, though its max_steps is larger."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class EngineProbe(Callback):
    """At the end of training, each rank writes what it holds into <run>/probe-rank<r>.pt: parameter
    and optimizer-state elements (to see ZeRO's partitions), and the model's logits on a fixed input
    (to compare with the consolidated checkpoint)."""

    def on_train_end(self, trainer, pl_module) -> None:
        import torch

        model = pl_module.model
        params = list(model.parameters())
        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        optimizer = trainer.optimizers[0]
        base = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO optimizer wraps the real one
        state = sum(t.numel() for s in base.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        from llm.train.optim import param_groups

        # which parameters the optimizer decays, as the module groups them from what it holds (under
        # ZeRO-3: flat partitions, whose full shape is in ds_shape)
        names = {id(p): n for n, p in model.named_parameters()}
        decayed = sorted(names[id(p)] for p in param_groups(model, 0.1)[0]["params"])
        idx = (torch.arange(48) * 7 % model.config.vocab_size).view(2, 24).to(pl_module.device)
        model.eval()
        with torch.no_grad():
            logits = model(idx).float().cpu()  # ZeRO-3 gathers each layer's shards on every rank here
        model.train()
        probe = {"params_held": held, "params_total": total, "optimizer_state": state, "logits": logits, "idx": idx}
        probe["decayed"] = decayed
        torch.save(probe, f"{trainer.default_root_dir}/probe-rank{trainer.global_rank}.pt")


class EngineBuilds(Callback):
    """Counts the DeepSpeed engines this process builds (deepspeed.initialize calls, each let through
    to DeepSpeed) and writes the count into <run>/engine-builds-rank<r>.txt at the end of training."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        import deepspeed

        self.builds, initialize = 0, deepspeed.initialize

        def counted(*args, **kwargs):
            self.builds += 1
            return initialize(*args, **kwargs)

        deepspeed.initialize = counted  # Lightning's strategy calls it after the callbacks' setup

    def on_train_end(self, trainer, pl_module) -> None:
        Path(trainer.default_root_dir, f"engine-builds-rank{trainer.global_rank}.txt").write_text(str(self.builds))


class ClipProbe(Callback):
    """Writes <run>/clip-probe.json: whether the optimizer is torch's fused AdamW, and the global
    gradient norm each optimizer step used. Lightning runs the forward, backward and clipping inside
    optimizer.step(closure) and zeroes the gradients only before the next backward, so at the end of
    a batch they are the ones the step saw, after any clipping."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.norms: list[float] = []
        self.fused = bool(trainer.optimizers[0].defaults.get("fused"))

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        import torch

        grads = [p.grad.detach().float().norm() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(torch.stack(grads).norm().item())

    def on_train_end(self, trainer, pl_module) -> None:
        import json

        out = {"fused": self.fused, "norms_at_step": self.norms}
        with open(f"{trainer.default_root_dir}/clip-probe.json", "w") as f:
            json.dump(out, f)


class BlockForwardCount(Callback):
    """Writes <run>/block-forwards-rank<r>.json: how often the Transformer blocks' forward ran in
    each training batch (once per block, twice with activation checkpointing: again in backward).
    It counts calls of forward itself, as module hooks do not see the recomputation."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.count, self.per_batch = 0, []
        for block in pl_module.model.blocks:
            block.forward = self._counted(block.forward)

    def _counted(self, forward):
        def wrapper(*args, **kwargs):
            self.count += 1
            return forward(*args, **kwargs)

        return wrapper

    def on_train_batch_start(self, *args) -> None:
        self.count = 0

    def on_train_batch_end(self, *args) -> None:
        self.per_batch.append(self.count)

    def on_train_end(self, trainer, pl_module) -> None:
        import json

        with open(f"{trainer.default_root_dir}/block-forwards-rank{trainer.global_rank}.json", "w") as f:
            json.dump(self.per_batch, f)


class BatchRecord(Callback):
    """Appends each training batch's step and a checksum of its tokens to <run>/batches-rank<r>.txt,
    at once, so that a killed run leaves what it trained on: to prove no sample was repeated or skipped."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        checksum = int((batch.double() * (1 + batch.new_tensor(range(batch.numel())).view_as(batch))).sum())
        with open(f"{trainer.default_root_dir}/batches-rank{trainer.global_rank}.txt", "a") as f:
            f.write(f"{trainer.global_step} {checksum}\n")


class PoisonLoss(Callback):
    """Makes the loss NaN at the given optimizer steps (counted from 0), so that every gradient is NaN."""

    def __init__(self, steps: list[int]):
        self.steps = set(steps)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if trainer.global_step in self.steps:
            loss.mul_(float("nan"))  # in the graph: every gradient becomes NaN


class RunsCode:
    """A payload: unpickling it runs a command, which leaves the file LLM_TEST_MARKER names."""

    def __reduce__(self):
        import os

        return (os.system, (f"touch {os.environ['LLM_TEST_MARKER']}",))


class _KillWhenPickled:
    def __reduce__(self):
        import os
        import signal

        os.killpg(os.getpgid(0), signal.SIGKILL)  # the whole job, as a lost node takes it


class _NoSpaceWhenPickled:
    def __reduce__(self):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")


class BreakSave(Callback):
    """At the save of `step`, puts an object into the checkpoint that, while torch.save writes it,
    kills the job (`kill`) or fails as a full disk does (`disk_full`)."""

    def __init__(self, step: int, how: str = "kill"):
        self.step, self.how = step, how

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            checkpoint["breaks"] = _KillWhenPickled() if self.how == "kill" else _NoSpaceWhenPickled()


class KillInValidation(Callback):
    """kill -9 of the job in the middle of the validation after `step`, as a lost node does."""

    def __init__(self, step: int):
        self.step = step

    def on_validation_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step and not trainer.sanity_checking:
            import os
            import signal

            os.killpg(os.getpgid(0), signal.SIGKILL)


class StallRank(Callback):
    """Rank `rank` sleeps `seconds` before the backward pass of optimizer step `step` (counted from
    0): the other ranks reach that step's gradient reduction alone, a collective that cannot complete."""

    def __init__(self, rank: int, step: int, seconds: float):
        self.rank, self.step, self.seconds = rank, step, seconds

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        import time

        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            time.sleep(self.seconds)


class NoSyncBetweenLogs(Callback):
    """On a GPU: any host synchronisation during a step that logs nothing raises (torch's sync
    debug mode "error"); logging steps, validation and checkpoints may synchronise."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import torch

        step = trainer.global_step + 1  # the optimizer step this batch belongs to
        logs = step % trainer.log_every_n_steps == 0 or step >= trainer.max_steps or step <= 2  # warm-up: compile
        torch.cuda.set_sync_debug_mode("default" if logs else "error")

    def on_train_batch_end(self, trainer, *args) -> None:
        import torch

        torch.cuda.set_sync_debug_mode("default")


class SlowRank(Callback):
    """Rank `rank` reaches the end of each validation `seconds` late (it runs before the project's
    own callbacks), so the other ranks are ahead of it there; writes <run>/slow-rank<r>.txt."""

    def __init__(self, rank: int, seconds: float):
        self.rank, self.seconds, self.times = rank, seconds, 0

    def on_validation_end(self, trainer, pl_module) -> None:
        import time

        if trainer.global_rank == self.rank and not trainer.sanity_checking:
            time.sleep(self.seconds)
            self.times += 1
            with open(f"{trainer.default_root_dir}/slow-rank{self.rank}.txt", "w") as f:
                f.write(str(self.times))


class TeacherProbe(Callback):
    """A distillation run's teacher, as the trainer holds it: <run>/teacher-probe.pt has the
    student's weights at the start (before any step), the teacher's at the end, whether it was in
    eval mode and frozen, and how many of its tensors the optimizer holds."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_end(self, trainer, pl_module) -> None:
        import torch

        teacher = pl_module.teacher
        optimizer = trainer.optimizers[0]
        base = getattr(optimizer, "optimizer", optimizer)
        held = {id(p) for group in base.param_groups for p in group["params"]}
        probe = {
            "student_start": self.start,
            "teacher_end": {k: v.detach().cpu().float().clone() for k, v in teacher.state_dict().items()},
            "teacher_training": teacher.training,
            "teacher_requires_grad": any(p.requires_grad for p in teacher.parameters()),
            "teacher_in_optimizer": sum(id(p) in held for p in teacher.parameters()),
            "teacher_dtype": str(teacher.lm_head.weight.dtype),
        }
        torch.save(probe, f"{trainer.default_root_dir}/teacher-probe-rank{trainer.global_rank}.pt")


class StepSleep(Callback):
    """Each optimizer step takes `seconds` longer, as a larger model's would."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, *args) -> None:
        import time

        time.sleep(self.seconds)


class HostReads(Callback):
    """Counts the host's reads of tensors and the tensors made from Python values on a device
    (llm/observe/host_syncs.py) between the start of a batch and the start of the next, for every
    batch whose optimizer step is not a logging step (nor the last): there a run should not wait
    for the device. Writes {"counted_steps": batches counted, "reads": {what and where: count}} to
    <run>/host-reads-rank<r>.json. On a CPU every read counts, as the one a GPU run would make."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        from llm.observe.host_syncs import HostSyncs

        self.syncs, self.counted_steps = HostSyncs(trainer.strategy.root_device, skip=(__file__,)), 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.syncs.__enter__()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step + 1  # the optimizer step this batch belongs to
        if self.syncs.counting:
            self.counted_steps += 1
        # not a logging step, not the last, and past the first two (which build what the run keeps)
        self.syncs.counting = bool(step % trainer.log_every_n_steps) and 2 < step < trainer.max_steps

    def teardown(self, trainer, pl_module, stage: str) -> None:  # also after a failure: torch as it was
        self.syncs.__exit__(None, None, None)

    def on_train_end(self, trainer, pl_module) -> None:
        import json

        self.syncs.__exit__(None, None, None)
        result = {"counted_steps": self.counted_steps, "reads": dict(self.syncs.counts)}
        path = f"{trainer.default_root_dir}/host-reads-rank{trainer.global_rank}.json"
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


class AccumulationProbe(Callback):
    """Writes <run>/accumulation.json at the start of training: the optimizer DeepSpeed built (its
    ZeRO optimizer, or another one it chose instead) and the dtype it sums the micro-batches'
    gradients in."""

    def on_train_start(self, trainer, pl_module) -> None:
        import json

        optimizer = trainer.optimizers[0]
        dtype = getattr(optimizer, "gradient_accumulation_dtype", None)
        result = {"optimizer": type(optimizer).__name__, "accumulation_dtype": str(dtype)}
        result["parameters_dtype"] = str(next(pl_module.parameters()).dtype)
        with open(f"{trainer.default_root_dir}/accumulation.json", "w") as f:
            json.dump(result, f)


class CrashAtStart(Callback):
    """A run that fails once its run folder exists and before its first step, as a library's error
    in building the trainer's parts would."""

    def on_fit_start(self, trainer, pl_module) -> None:
        raise RuntimeError("crashed at the start, on purpose")


class CallbackOrder(Callback):
    """Writes the class names of the trainer's callbacks, in the order Lightning calls them, to
    callback-order.txt in the run folder."""

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            names = [type(c).__name__ for c in trainer.callbacks]
            Path(trainer.default_root_dir, "callback-order.txt").write_text("\n".join(names) + "\n")


class SignalHandlers(Callback):
    """Write which handler each stop signal has while training runs (llm/signals.py owns them)."""

    def __init__(self, out: str):
        self.out = out

    def on_train_batch_start(self, trainer, *args) -> None:
        import json
        import signal

        handlers = {
            s.name: getattr(signal.getsignal(s), "__qualname__", str(signal.getsignal(s)))
            for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
        }
        Path(self.out).write_text(json.dumps(handlers))


class Request:
    """What lm-eval hands a model: a request's arguments."""

    def __init__(self, *args):
        self.args = args


def score_a_share(rank: int, world: int, port: int, out: str) -> None:
    """One rank of tests/test_in_loop_eval.py's share test: a share of requests of its own size
    scored and generated, over gloo; the forward passes it ran and what the collectives gave, in `out`."""
    import json

    import torch
    import torch.distributed as dist
    from tokenizers import Tokenizer, models

    from llm.benchmarks.harness import CheckpointLM
    from llm.model import ModelConfig, Transformer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=1, n_head=1, n_embd=16, block_size=16, vocab_size=64)).eval()
    with torch.no_grad():
        model.lm_head.weight[0] = 0  # end-of-text's logit 0 among 63 random ones: generation runs to its limit
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    lm = CheckpointLM(model, Tokenizer(models.BPE()), 0, batch_size=2, rank=rank, world_size=world, progress=False)
    lm.score([([1, 2, 3], [4, 5])] * (3 if rank == 0 else 9), "log-likelihoods", quiet=True)
    scored = len(calls)
    lm.generate_until([Request("", {"until": ["never"], "max_gen_toks": 2 if rank == 0 else 6})])
    report = {
        "scored": scored,
        "generated": len(calls) - scored,
        "gathered": lm.all_gather(torch.tensor(rank + 10)).tolist(),
        "objects": lm.gather_object({"rank": rank}, dst=0),
    }
    Path(f"{out}{rank}").write_text(json.dumps(report))
    dist.destroy_process_group()
