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

import hashlib
from pathlib import Path

import torch
from tokenizers import Tokenizer

from llm.checkpoint import Checkpoint, safe_load
from llm.config import DistillConfig, RunConfig, datamodule_args
from llm.data.prepare import prepared_dir
from llm.errors import ConfigError
from llm.hf import from_hf_config, load_pretrained, read_config, refuse_quantized
from llm.model import ModelConfig, Transformer
from llm.train.strategy import load_preset

FIELD = "distill.teacher"


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


def is_folder(teacher: str) -> bool:
    """A transformers folder (config.json), rather than a checkpoint of this project."""
    return (Path(teacher) / "config.json").is_file()


def teacher_config(teacher: str) -> ModelConfig:
    """The teacher's architecture, read without its weights."""
    if is_folder(teacher):
        config = read_config(Path(teacher), FIELD)
        refuse_quantized(config, teacher, FIELD)
        return from_hf_config(config, f"{FIELD}={teacher}")
    return Checkpoint(teacher, FIELD).header().run_config.model


def teacher_digest(teacher: str) -> str:
    """What identifies the teacher's contents, which a resumed distillation must find unchanged: a
    checkpoint's (Checkpoint.digest), or a transformers folder's config and weights, hashed."""
    if not is_folder(teacher):
        return Checkpoint(teacher, FIELD).digest()
    folder = Path(teacher)
    digest = hashlib.sha256()
    for file in sorted([folder / "config.json", *folder.glob("*.safetensors"), *folder.glob("*.bin")]):
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def teacher_tokenizer(teacher: str) -> Tokenizer:
    if is_folder(teacher):
        file = Path(teacher) / "tokenizer.json"
        if not file.is_file():
            raise ConfigError(f"{FIELD}={teacher}: the folder has no tokenizer.json; give a folder make export wrote")
        return Tokenizer.from_file(str(file))
    checkpoint = Checkpoint(teacher, FIELD)
    return Tokenizer.from_str(safe_load(checkpoint.client_state_file(), FIELD, mmap=True)["tokenizer_json"])


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


def resolve(cfg) -> None:
    """A transformers-folder teacher brings its tokenizer: the student's data is cut by it unless
    TOKENIZER= says otherwise (which check() then compares)."""
    teacher = cfg.distill.teacher
    data = datamodule_args(cfg.data)
    if teacher and data.tokenizer is None and is_folder(teacher) and (Path(teacher) / "tokenizer.json").is_file():
        data.tokenizer = str(Path(teacher) / "tokenizer.json")


def check(run: RunConfig) -> None:
    """Every distillation setting that cannot work, refused in one line before anything is loaded."""
    d = run.distill
    if d.teacher is not None and not d.teacher.strip():
        raise ConfigError(
            "distill.teacher is empty: give the teacher, e.g. make distill TEACHER=runs/<name>/checkpoints/best.ckpt"
        )
    if not d.teacher:
        if d.init:
            raise ConfigError(f"distill.init={d.init}: starts the student from a teacher; give distill.teacher too")
        return
    rules = [
        ("distill.alpha", d.alpha, 0 <= d.alpha <= 1, "between 0 (data only) and 1 (teacher only), e.g. 0.5"),
        ("distill.temperature", d.temperature, d.temperature > 0, "a positive temperature, e.g. 2.0"),
        ("distill.until", d.until, 0 < d.until <= 1, "a fraction of the run in (0, 1], e.g. 1.0"),
        ("distill.chunk_tokens", d.chunk_tokens, d.chunk_tokens >= 1, "1 or more tokens, e.g. 4096"),
    ]
    for name, value, ok, needed in rules:
        if not ok:
            raise ConfigError(f"{name}={value}: out of range; use {needed}")
    if not Path(d.teacher).exists():
        raise ConfigError(
            f"{FIELD}={d.teacher}: no such checkpoint or folder; give runs/<name>/checkpoints/best.ckpt "
            "or a transformers folder (make export)"
        )
    options = run.options
    if options.deepspeed and load_preset(options.deepspeed, options.nvme_path)["zero_optimization"]["stage"] == 3:
        raise ConfigError(
            f"deepspeed={options.deepspeed}: ZeRO-3 would partition the teacher, and its engine gathers only the "
            "parameters of the student it wraps; distill with zero1, zero2 or zero2_offload"
        )
    teacher = teacher_config(d.teacher)
    check_tokenizer(run, d.teacher)
    if d.init:
        if run.init:
            raise ConfigError(f"distill.init={d.init}: the student already starts from model.init={run.init}; drop one")
        check_same_shapes(run.model, teacher, d.teacher)


def check_tokenizer(run: RunConfig, teacher: str) -> None:
    """Teacher and student must number their tokens alike: the KL compares their distributions
    token id by token id."""
    data = run.data
    if data.tokenizer:
        if Tokenizer.from_file(data.tokenizer).get_vocab() != teacher_tokenizer(teacher).get_vocab():
            raise ConfigError(
                f"data.tokenizer={data.tokenizer}: not the tokenizer {FIELD}={teacher} was trained with; the "
                "student must use the teacher's tokenizer (drop TOKENIZER= for a transformers folder)"
            )
        return
    teacher_data = None if is_folder(teacher) else Checkpoint(teacher, FIELD).header().run_config.data
    if teacher_data == data:
        return  # the teacher's own data: the same prepared folder, the same BPE
    found = prepared_dir(teacher_data) if teacher_data else None
    hint = (
        f"TOKENIZER={found / 'tokenizer.json'}"
        if found and (found / "tokenizer.json").is_file()
        else ("TOKENIZER= the teacher's tokenizer.json (make export CKPT=<teacher> writes one)")
    )
    raise ConfigError(
        f"{FIELD}={teacher}: the student's data would train a new tokenizer, not the teacher's; give {hint}"
    )


def check_same_shapes(student: ModelConfig, teacher: ModelConfig, path: str) -> None:
    """--distill.init=teacher_layers copies tensors: every one the student has must have the
    teacher's shape, and the teacher at least as many blocks."""
    with torch.device("meta"):
        s, t = Transformer(student), Transformer(teacher)
    hint = "give the student the teacher's n_embd, n_head, mlp and vocabulary, or drop distill.init"
    if len(s.blocks) > len(t.blocks):
        raise ConfigError(
            f"distill.init=teacher_layers: the student has {len(s.blocks)} blocks and {FIELD}={path} only "
            f"{len(t.blocks)}; a student of at most {len(t.blocks)} blocks"
        )
    teacher_shapes = {k: v.shape for k, v in t.state_dict().items()}
    for name, tensor in s.state_dict().items():
        source = name if not name.startswith("blocks.") else "blocks.0." + name.split(".", 2)[2]
        if teacher_shapes.get(source) != tensor.shape:
            raise ConfigError(
                f"distill.init=teacher_layers: the student's {name} has shape {tuple(tensor.shape)}, the "
                f"teacher's {tuple(teacher_shapes.get(source, ()))}; {hint}"
            )
