"""Peak FLOP/s of one device, the denominator of MFU, and where the number came from.

In order: `--peak_flops` when given; this project's table of dense datasheet peaks for the GPUs
people train on (consulted first: Lightning's own table lacks some of them, the plain "NVIDIA H200"
among them, and lists sparse figures for others); Lightning's table; else a matmul measured on the
device itself (a GPU's peak is never measured on the CPU). Sparse "with sparsity" figures of the
datasheets are twice the dense ones and are never used: training does not run 2:4 sparse matmuls.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

T = 1e12
# (pattern on the lowercased CUDA device name, the GPU, its dense peaks in FLOP/s). The first match
# wins, so the more specific names come first ("h100 nvl" before "h100", "l40s" before "l4").
# bf16 = fp16 tensor-core peak with fp32 accumulation (what training uses); tf32 = tensor-core
# fp32 matmuls, which torch uses for float32 when float32_matmul_precision is "high" (as `fit` sets it).
GPU_PEAKS: list[tuple[str, str, dict[str, float]]] = [
    # Blackwell: HGX B200 datasheet (per GPU, dense = half the sparse figures)
    (r"\bb200\b", "B200", {"bf16": 2250 * T, "tf32": 1125 * T, "fp32": 75 * T}),
    # Hopper: H100 and H200 datasheets; GH200's GPU is an H100/H200 SXM part
    (r"\bgh200\b", "GH200", {"bf16": 989.4 * T, "tf32": 494.7 * T, "fp32": 66.9 * T}),
    (r"\bh200 nvl\b", "H200 NVL", {"bf16": 835.5 * T, "tf32": 417.5 * T, "fp32": 60 * T}),
    (r"\bh200\b", "H200 SXM", {"bf16": 989.4 * T, "tf32": 494.7 * T, "fp32": 66.9 * T}),
    (r"\bh100 nvl\b", "H100 NVL", {"bf16": 835.5 * T, "tf32": 417.5 * T, "fp32": 60 * T}),
    (r"\bh100 pcie\b", "H100 PCIe", {"bf16": 756 * T, "tf32": 378 * T, "fp32": 51.2 * T}),
    (r"\bh100\b", "H100 SXM", {"bf16": 989.4 * T, "tf32": 494.7 * T, "fp32": 66.9 * T}),  # "H100 80GB HBM3"
    # Ada: L4 and L40S datasheets, Ada whitepaper for the RTX 4090 (fp16/bf16 with fp32 accumulate)
    (r"\bl40s\b", "L40S", {"bf16": 362.05 * T, "tf32": 183 * T, "fp32": 91.6 * T}),
    (r"\bl4\b", "L4", {"bf16": 121 * T, "tf32": 60 * T, "fp32": 30.3 * T}),
    (r"\brtx 4090\b", "RTX 4090", {"bf16": 165.2 * T, "tf32": 82.6 * T, "fp32": 82.6 * T}),
    # Ampere: A100 and A10 datasheets; A10G (AWS) has 80 SMs with GeForce-rate tensor cores;
    # GA102 whitepaper for the RTX 3090 (fp16/bf16 with fp32 accumulate)
    (r"\ba100\b", "A100", {"bf16": 312 * T, "tf32": 156 * T, "fp32": 19.5 * T}),
    (r"\ba10g\b", "A10G", {"bf16": 70 * T, "tf32": 35 * T, "fp32": 35 * T}),
    (r"\ba10\b", "A10", {"bf16": 125 * T, "tf32": 62.5 * T, "fp32": 31.2 * T}),
    (r"\brtx 3090\b(?! ti)", "RTX 3090", {"bf16": 71 * T, "tf32": 35.6 * T, "fp32": 35.6 * T}),
]


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s of one device
    source: str  # where the number came from, printed in the run's header

    def describe(self) -> str:
        shown = f"{self.flops / T:,.1f} TFLOP/s" if self.flops >= T else f"{self.flops / 1e9:,.1f} GFLOP/s"
        return f"{shown} ({self.source})"


def peak_kind(dtype: torch.dtype) -> str:
    """Which column of the table a training dtype uses."""
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    return "tf32" if torch.get_float32_matmul_precision() != "highest" else "fp32"


def table_peak(device_name: str, dtype: torch.dtype) -> Peak | None:
    name = device_name.lower()
    kind = peak_kind(dtype)
    for pattern, gpu, peaks in GPU_PEAKS:
        if re.search(pattern, name):
            return Peak(peaks[kind], f"{gpu} datasheet, dense {kind}")
    return None


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 8) -> float:
    """FLOP/s of the best of a few n×n products on `device` itself (on a CPU, with the threads torch
    uses): for hardware no datasheet covers. A GPU needs a large n to reach its peak. Through
    `F.linear`, as the model's layers compute: on a CPU without bf16 instructions a bf16 `a @ b`
    takes a fallback 15 times slower than linear's (0.6 against 9 GFLOP/s on a 2-core AMD EPYC),
    which made bf16 MFU read above 1."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    linear = torch.nn.functional.linear  # a @ b.T: the same 2 n³ FLOPs
    linear(a, b)  # warm-up: thread pool, caches, kernel selection
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        linear(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def find_peak(device: torch.device, dtype: torch.dtype, override: float | None = None) -> Peak:
    """The peak FLOP/s of one device for the training dtype, and its source."""
    if override:
        return Peak(float(override), "--peak_flops")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = table_peak(name, dtype)
        if known:
            return known
        from lightning.fabric.utilities.throughput import get_available_flops

        lightning = get_available_flops(device, dtype)
        if lightning:
            return Peak(float(lightning), f"{name}, Lightning's table")
        return Peak(measure_matmul_peak(device, dtype), f"{name}, measured {str(dtype).removeprefix('torch.')} matmul")
    kind = str(dtype).removeprefix("torch.")
    return Peak(measure_matmul_peak(device, dtype), f"{device.type}, measured {kind} matmul")
