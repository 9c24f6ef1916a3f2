"""`make bench`'s distillation figures: the trainer's step with a frozen teacher against the same
step without one, interleaved in blocks as the paths are, and the step time the FLOPs predict,
(6·N_student + 2·N_teacher) / (6·N_student) times the plain step (attention's FLOPs included)."""

from __future__ import annotations

import statistics
from pathlib import Path

from bench_paths import BenchPath, trainer_block

from llm.model import ModelConfig, count_params, flops_per_token


def compare_distill(
    student: ModelConfig,
    teacher: ModelConfig,
    batch: int,
    data_kwargs: dict,
    data_folder: Path,
    precision: str,
    rounds: int,
    steps: int,
    warmup: int,
    accumulation: int,
    tmp: Path,
) -> dict:
    data_kwargs = {**data_kwargs, "block_size": student.block_size, "batch_size": batch}
    eager = BenchPath.parse("eager")
    times: dict[str, list[float]] = {"plain": [], "distilled": []}
    for r in range(rounds):
        for side in ("plain", "distilled") if r % 2 == 0 else ("distilled", "plain"):
            with_teacher = teacher if side == "distilled" else None
            clock = trainer_block(
                eager, student, data_kwargs, data_folder, precision, warmup, steps, accumulation, tmp, with_teacher
            )
            times[side].append(clock.block_step_seconds())
    plain, distilled = (statistics.median(times[side]) for side in ("plain", "distilled"))
    # a teacher's forward pass is a third of its training FLOPs (6N + attention, llm/model.py)
    predicted = (flops_per_token(student) + flops_per_token(teacher) / 3) / flops_per_token(student)
    return {
        "precision": precision,
        "student_params": count_params(student),
        "teacher_params": count_params(teacher),
        "tokens_per_step": batch * student.block_size * accumulation,
        "plain_step_seconds": plain,
        "distilled_step_seconds": distilled,
        "measured_ratio": distilled / plain,
        "predicted_ratio": predicted,
    }


def distill_line(d: dict) -> str:
    return (
        f"distillation ({d['precision']}): a {d['student_params'] / 1e6:.1f}M student's step "
        f"{d['plain_step_seconds'] * 1e3:,.0f} ms alone, {d['distilled_step_seconds'] * 1e3:,.0f} ms with a "
        f"{d['teacher_params'] / 1e6:.1f}M teacher: {d['measured_ratio']:.2f}x, the FLOPs predict "
        f"{d['predicted_ratio']:.2f}x"
    )
