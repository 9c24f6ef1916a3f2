"""Knowledge distillation (`make distill TEACHER=`): a frozen teacher's next-token distributions as
a second target for the student (Hinton et al., 2015):

    loss = (1 - alpha) * CE(student, data) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

T^2 keeps the soft term's gradients the size of the hard term's as T changes. Both models' logits
come from their final hidden states a chunk of tokens at a time, and each chunk's gradients with
respect to the student's hidden states and output weights are taken as its losses are (as fused
linear cross-entropy kernels do): the float32 logits of the two models (B·T·V·4 bytes each, 3.3 GB
for 16 x 1024 tokens of a 50k vocabulary) exist for one chunk only, and are computed once.

The teacher is frozen, in eval mode, in the training precision, and held outside the
LightningModule's registered modules (llm/train/module.py), so that no optimizer, checkpoint, DDP
or DeepSpeed wrapper ever sees it. Each process holds a whole copy: ZeRO-3, which would partition
it, is refused (its engine gathers only the parameters of the model it wraps).
"""

from __future__ import annotations

import torch

from llm.checkpointing.files import Checkpoint
from llm.config import DistillConfig
from llm.hf import load_pretrained
from llm.model import Transformer
from llm.preflight.teacher import FIELD, is_folder


class _ChunkedLosses(torch.autograd.Function):
    """The student's summed CE and KD terms, a chunk of tokens at a time, with their gradients with
    respect to the student's hidden states and output weights taken in the same pass (the softmax
    of a chunk is all they need): no chunk's logits are kept, and none is computed again in the
    backward pass, which only scales the two gradients by their losses' weights."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, y, temperature: float, chunk: int, with_grad: bool):
        t = temperature
        ce = torch.zeros((), device=h_s.device)
        kd = torch.zeros((), device=h_s.device)
        if with_grad:  # float32 accumulators: d(sum CE) and d(sum KD) by hidden state and by weight
            grads = [torch.zeros(h_s.shape, device=h_s.device), torch.zeros(w_s.shape, device=w_s.device)]
            grads += [torch.zeros_like(g) for g in grads]
        dtype = h_s.dtype  # the matmuls in the training precision, the softmax in float32
        w, w_teacher = w_s.to(dtype), w_t.to(h_t.dtype)
        for start in range(0, y.numel(), chunk):
            part = slice(start, start + chunk)
            h, target = h_s[part], y[part]
            logits = (h @ w.T).float()
            teacher = (h_t[part] @ w_teacher.T).float()
            vocab = min(logits.shape[-1], teacher.shape[-1])  # a padded vocabulary's extra rows are never targets
            log_q = torch.log_softmax(logits, dim=-1)
            ce = ce - log_q.gather(1, target[:, None]).sum()
            log_q_t = torch.log_softmax(logits[:, :vocab] / t, dim=-1)
            log_p_t = torch.log_softmax(teacher[:, :vocab] / t, dim=-1)
            p_t = log_p_t.exp()
            kd = kd + t * t * (p_t * (log_p_t - log_q_t)).sum()
            if with_grad:
                d_ce = log_q.exp()  # softmax - one-hot
                d_ce[torch.arange(len(target), device=h.device), target] -= 1
                d_kd = torch.zeros_like(logits)
                d_kd[:, :vocab] = t * (log_q_t.exp() - p_t)  # d/dz of T^2 KL(p_T || softmax(z / T))
                for d, (g_h, g_w) in ((d_ce, grads[0:2]), (d_kd, grads[2:4])):
                    g_h[part] = d.to(dtype) @ w
                    g_w += d.T.to(dtype) @ h
        if with_grad:
            ctx.save_for_backward(*grads)
        ctx.dtypes = h_s.dtype, w_s.dtype
        return ce, kd

    @staticmethod
    def backward(ctx, g_ce, g_kd):
        gh_ce, gw_ce, gh_kd, gw_kd = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        grad_h = (g_ce * gh_ce + g_kd * gh_kd).to(h_dtype)
        grad_w = (g_ce * gw_ce + g_kd * gw_kd).to(w_dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def losses(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    targets: torch.Tensor,
    student_head: torch.Tensor,
    teacher_head: torch.Tensor,
    temperature: float,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean next-token CE of the student and the mean T^2-scaled KL to the teacher, from hidden
    states (B, T, C) and the output layers' weights (V, C), `chunk_tokens` tokens at a time."""
    h_s, h_t, y = student_hidden.flatten(0, 1), teacher_hidden.flatten(0, 1).detach(), targets.flatten()
    with_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or student_head.requires_grad)
    args = (h_s, student_head, h_t, teacher_head.detach(), y, temperature, chunk_tokens, with_grad)
    ce, kd = _ChunkedLosses.apply(*args)
    return ce / y.numel(), kd / y.numel()


def alpha_at(config: DistillConfig, step: int, max_steps: int) -> float:
    """The teacher's weight at an optimizer step: alpha until `until` of the run, then 0."""
    return config.alpha if step < config.until * max_steps else 0.0


def load_teacher(teacher: str) -> Transformer:
    """The teacher, frozen and in eval mode, on the CPU in float32 (module.py moves it)."""
    if is_folder(teacher):
        config, state = load_pretrained(teacher, FIELD)
        model = Transformer(config)
        model.load_state_dict(state)
    else:
        model = Checkpoint(teacher, FIELD).load().model
    return model.requires_grad_(False).eval()


def teacher_layers(student: int, teacher: int) -> list[int]:
    """The teacher's blocks a student of `student` blocks starts from: every k-th, spread evenly."""
    return [i * teacher // student for i in range(student)]


@torch.no_grad()
def init_from_teacher(student: Transformer, teacher: Transformer) -> list[int]:
    """--distill.init=teacher_layers: the student's embeddings, final norm, output layer and blocks
    copied from the teacher's (every k-th block); the teacher's block indices."""
    chosen = teacher_layers(len(student.blocks), len(teacher.blocks))
    for name in ("tok_emb", "pos_emb", "norm", "lm_head"):
        source = getattr(teacher, name)
        if source is not None:
            getattr(student, name).load_state_dict(source.state_dict())
    for block, index in zip(student.blocks, chosen, strict=True):
        block.load_state_dict(teacher.blocks[index].state_dict())
    return chosen
