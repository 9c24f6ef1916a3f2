"""`make bench`: the project's trainer against its references, and `make prepare` against a plain
tokenizer loop, in one process; a table on the terminal and one JSON file.

A path is a way to train: eager, compiled, or a ZeRO preset. Its reference is a plain PyTorch loop
(scripts/raw_loop.py), or for a ZeRO preset DeepSpeed's own engine with the same config, driven
by hand. The two sides of a path run the same model, data, optimizer, schedule, clipping, precision
and gradient accumulation, interleaved in blocks (trainer, reference, then reference, trainer, ...),
because absolute times on a shared machine drift by 20% from one minute to the next and only a
ratio taken side by side means anything. A block compiles afresh (Dynamo reset) in its warm-up
steps; the device is synchronised only at the two edges of its measured steps, as a run waits for
it only at logging steps, and the step time is the time between them per optimizer step, data
loading included. Between the edges each side's host synchronisations are counted
(llm/observe/host_syncs.py) and reported per optimizer step, with the lines that asked for them.
The trainer side is Lightning's Trainer with the run's LanguageModel, strategy, TokenDataModule,
every callback of a run and CSV logging, without validation (not a per-step cost).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as `python -m llm` sets it

import torch  # noqa: E402
import yaml  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as `python -m llm` sets it

from bench_distill import compare_distill, distill_line  # noqa: E402
from bench_paths import BenchPath, device, reference_block, trainer_block  # noqa: E402

from llm.model import ModelConfig, count_params, flops_per_token  # noqa: E402

SHARED = Path(os.environ.get("LLM_SHARED_DATA", REPO.parent / "shared" / "data"))
MODELS = {  # name -> (architecture, sequences per micro-batch)
    "tiny": ({**yaml.safe_load((REPO / "configs/model/tiny.yaml").read_text())}, 32),
    "10m": ({"block_size": 128, "n_layer": 6, "n_head": 5, "n_embd": 320}, 16),  # 10.0M with 8192 tokens
    "gpt2-124m": ({**yaml.safe_load((REPO / "configs/model/gpt2-124m.yaml").read_text())}, 16),
}


def compare(
    path: BenchPath,
    name: str,
    precision: str,
    data_kwargs: dict,
    data_folder: Path,
    vocab: int,
    rounds: int,
    steps: int,
    warmup: int,
    accumulation: int,
    tmp: Path,
) -> dict:
    """Step time (the median over blocks of each block's time between its synchronised edges, per
    step), tokens/s, MFU, peak memory and host synchronisations per optimizer step of a path through
    the trainer and through its reference, and their ratio."""
    from llm.config import compute_dtype
    from llm.observe.peaks import find_peak

    fields, batch = MODELS[name]
    config = ModelConfig(**{**fields, "vocab_size": fields.get("vocab_size") or vocab})
    data_kwargs = {**data_kwargs, "block_size": config.block_size, "batch_size": batch}
    peak = find_peak(device(), compute_dtype(precision))
    sides = ("trainer", "reference")
    blocks: dict[str, list[float]] = {side: [] for side in sides}  # each block's step time
    times: dict[str, list[float]] = {side: [] for side in sides}  # each step's, as the host saw it
    cpu_times: dict[str, list[float]] = {side: [] for side in sides}
    memory = dict.fromkeys(sides, 0.0)
    syncs = {side: collections.Counter() for side in sides}  # where the host waited, over every block
    step_syncs: dict[str, list[int]] = {side: [] for side in sides}  # how often, in each measured step
    paired = []  # trainer / reference per round: the two blocks of a round ran next to each other in time
    for r in range(rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            if device().type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            blocks_of = (warmup, steps, accumulation)
            if side == "trainer":
                clock = trainer_block(path, config, data_kwargs, data_folder, precision, *blocks_of, tmp)
            else:
                clock = reference_block(path, config, data_kwargs, precision, *blocks_of)
            blocks[side].append(clock.block_step_seconds())
            times[side] += clock.step_times()
            cpu_times[side] += clock.step_times(cpu=True)
            memory[side] = max(memory[side], clock.peak)
            syncs[side].update(clock.syncs.counts)
            step_syncs[side] += clock.step_syncs
        paired.append(blocks["trainer"][-1] / blocks["reference"][-1])
    tokens_per_step = batch * config.block_size * accumulation
    fpt = flops_per_token(config)
    result = {
        "path": path.name,
        "reference_kind": path.reference,
        "deepspeed": path.deepspeed,
        "compile": path.compile,
        "model": name,
        "params": count_params(config),
        "precision": precision,
        "batch": batch,
        "accumulation": accumulation,
        "block_size": config.block_size,
        "tokens_per_step": tokens_per_step,
        "flops_per_token": fpt,
        "peak_flops": peak.flops,
        "peak_flops_source": peak.source,
        "steps_measured": len(times["trainer"]),
    }
    for side in sides:
        median = statistics.median(blocks[side])
        q = statistics.quantiles(times[side], n=10) if len(times[side]) > 1 else times[side] * 9
        result[side] = {
            "median_step_seconds": median,
            "block_step_seconds": blocks[side],
            "p10_step_seconds": q[0],
            "p90_step_seconds": q[-1],
            "tokens_per_sec": tokens_per_step / median,
            "mfu": tokens_per_step / median * fpt / peak.flops,
            "peak_memory_gib": memory[side] / 2**30,
            "median_cpu_seconds_per_step": statistics.median(cpu_times[side]),
            "host_syncs_per_step": syncs[side].total() / len(times[side]),
            "host_syncs": {where: n / len(times[side]) for where, n in sorted(syncs[side].items())},
            "host_syncs_each_step": step_syncs[side],
        }
    trainer, reference = result["trainer"], result["reference"]
    result["ratio_trainer_to_reference"] = trainer["median_step_seconds"] / reference["median_step_seconds"]
    result["overhead_percent"] = 100 * (result["ratio_trainer_to_reference"] - 1)
    result["paired_round_ratios"] = paired
    result["cpu_time_ratio"] = trainer["median_cpu_seconds_per_step"] / reference["median_cpu_seconds_per_step"]
    result["overhead_percent_paired_median"] = 100 * (statistics.median(paired) - 1)
    return result


def prepare_bench(quick: bool, tmp: Path) -> dict:
    """`make prepare` (datasets.map on every core) against one process calling tokenizer.encode on
    the same documents, in the same way: as text (quoted special tokens included), each followed by
    an end-of-text token, empty ones skipped. Both must count the same tokens."""
    from tokenizers import Tokenizer

    from llm.config import PrepareConfig
    from llm.data.prepare import load_meta, prepare
    from llm.data.sources import stdlib_files
    from llm.data.tokenizer import ordinary

    tokenizer = SHARED / "gpt2" / "tokenizer.json"
    if not tokenizer.is_file():
        return {"skipped": f"{tokenizer} is absent (the GPT-2 tokenizer lives in ../shared/data)"}
    files, text = stdlib_files(), None
    if quick:  # 120 of those files as a folder of text files
        folder = tmp / "prep-corpus"
        folder.mkdir()
        for i, path in enumerate(files[:120]):
            (folder / f"{i:03d}-{path.stem}.txt").write_text(path.read_text(errors="replace"))
        files, text = sorted(folder.glob("*.txt")), str(folder)
    start = time.perf_counter()
    config = PrepareConfig(text=text, tokenizer=str(tokenizer), cache_dir=str(tmp / "prep"))
    prepared = prepare(config, log=lambda *_: None)
    prep_seconds = time.perf_counter() - start
    meta = load_meta(prepared)
    prep_tokens = sum(s["tokens"] for s in meta["splits"].values())

    tok = ordinary(Tokenizer.from_file(str(tokenizer)))
    start, loop_tokens = time.perf_counter(), 0
    for path in files:
        document = path.read_text(errors="replace")
        if document.strip():
            loop_tokens += len(tok.encode(document, add_special_tokens=False).ids) + 1
    loop_seconds = time.perf_counter() - start
    return {
        "corpus": text or "the embedded corpus (standard library .py files)",
        "files": len(files),
        "tokenizer": str(tokenizer),
        "num_proc": os.cpu_count(),
        "prepare": {"tokens": prep_tokens, "seconds": prep_seconds, "tokens_per_sec": prep_tokens / prep_seconds},
        "plain_loop": {"tokens": loop_tokens, "seconds": loop_seconds, "tokens_per_sec": loop_tokens / loop_seconds},
        "speedup": (prep_tokens / prep_seconds) / (loop_tokens / loop_seconds),
    }


def environment() -> dict:
    import datasets
    import deepspeed
    import lightning
    import tokenizers

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "deepspeed": deepspeed.__version__,
        "datasets": datasets.__version__,
        "tokenizers": tokenizers.__version__,
        "platform": platform.platform(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def bench(
    quick: bool = False,
    out: str = "bench.json",
    paths: list[str] | None = None,
    models: list[str] | None = None,
    precisions: list[str] | None = None,
    rounds: int | None = None,
    steps: int | None = None,
    warmup: int = 2,
    accumulation: int | None = None,
    num_workers: int = 0,
    distill: bool = True,
) -> dict:
    """Benchmark the trainer against its references, and data preparation against a plain loop.

    Args:
        quick: a few steps of the tiny model on a small text (what the tests run)
        out: the JSON file to write
        paths: eager, compiled (trainer against a plain torch loop), zero1, zero2, zero3 (trainer
            against DeepSpeed's engine with the same config), each DeepSpeed one also with -compiled
            (default: all five on a GPU; eager on CPU)
        models: which of tiny, 10m, gpt2-124m (default: tiny and 10m; tiny alone when quick)
        precisions: 32-true and/or bf16-mixed (default: both on CPU, bf16-mixed on GPU)
        rounds: blocks per side, alternating which side goes first (default 4 on CPU, 2 on GPU; 1 when quick)
        steps: measured optimizer steps per block (default 10 on a GPU, 4 on CPU; 3 when quick)
        warmup: optimizer steps per block before measuring (compilation happens there)
        accumulation: micro-batches per optimizer step on both sides (default 8, as the recipes
            accumulate; 2 when quick)
        num_workers: DataLoader workers on both sides
        distill: time the tiny model's step distilled from the 10m one against its plain step
    """
    import datasets

    from llm.config import PrepareConfig
    from llm.data.prepare import prepare
    from llm.observe.loggers import quiet_lightning

    quiet_lightning()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # not the devices' lines, per block
    datasets.disable_progress_bars()  # the bench prints its own lines
    gpu = torch.cuda.is_available()
    paths = paths or (["eager", "compiled", "zero1", "zero2", "zero3"] if gpu else ["eager"])
    chosen = [BenchPath.parse(p) for p in paths]
    models = models or (["tiny"] if quick else ["gpt2-124m"] if gpu else ["tiny", "10m"])
    precisions = precisions or (["bf16-mixed"] if gpu else ["32-true", "bf16-mixed"])
    # a GPU's step times vary far less than those of a shared 2-core VM: fewer rounds say as much
    # each step is `accumulation` micro-batches: on a 2-core CPU 4 steps a block take what 10 take on a GPU
    rounds, steps = rounds or (1 if quick else 2 if gpu else 4), steps or (3 if quick else 10 if gpu else 4)
    accumulation = accumulation or (2 if quick else 8)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if quick:  # a small text and a small BPE
            corpus = tmp / "small.txt"
            corpus.write_text(
                "\n\n".join(
                    Path(json.__file__).parent.joinpath(f).read_text()
                    for f in ("decoder.py", "encoder.py", "scanner.py")
                )
                * 4
            )
            data = {"text": str(corpus), "vocab_size": 512, "cache_dir": str(tmp / "data")}
        else:  # the embedded corpus and tokenizer of `make train`, from its cache in data/
            corpus, data = None, {"cache_dir": str(REPO / "data")}
        folder = prepare(PrepareConfig(**data), log=lambda *_: None)
        # in-process loading on both sides: on 2 cores a loader worker competes with the compute threads
        # and its jitter would drown a difference of a few percent; --num_workers sets another count
        data["num_workers"] = num_workers
        vocab = json.loads((folder / "meta.json").read_text())["vocab_size"]
        vocab = -(-vocab // 64) * 64
        results = {
            "settings": {
                "quick": quick,
                "paths": [p.name for p in chosen],
                "rounds": rounds,
                "steps_per_block": steps,
                "warmup_steps": warmup,
                "accumulation": accumulation,
                "num_workers": data["num_workers"],
                "data": str(folder),
            },
            "environment": environment(),
            "training": [],
            "data_preparation": None,
            "distillation": None,
        }
        for path in chosen:
            for name in models:
                for precision in precisions:
                    print(f"bench: {path.name} {name} {precision} ...", file=sys.stderr, flush=True)
                    row = compare(path, name, precision, data, folder, vocab, rounds, steps, warmup, accumulation, tmp)
                    results["training"].append(row)
        if distill:
            print("bench: distillation ...", file=sys.stderr, flush=True)
            student, batch = MODELS["tiny"]
            teacher = MODELS["10m"][0]
            configs = [
                ModelConfig(**{**f, "vocab_size": vocab, "block_size": student["block_size"]})
                for f in (student, teacher)
            ]
            precision = "bf16-mixed" if gpu else "32-true"
            # a ratio of two step times, which accumulation does not change: one micro-batch a step
            results["distillation"] = compare_distill(
                *configs, batch, data, folder, precision, rounds, steps, warmup, 1, tmp
            )
        print("bench: data preparation ...", file=sys.stderr, flush=True)
        results["data_preparation"] = prepare_bench(quick, tmp)
    eager = [r for r in results["training"] if r["path"] == "eager"]
    bf16 = {r["model"]: r for r in eager if r["precision"] == "bf16-mixed"}
    fp32 = {r["model"]: r for r in eager if r["precision"] == "32-true"}
    results["bf16_speedup"] = {
        m: bf16[m]["trainer"]["tokens_per_sec"] / fp32[m]["trainer"]["tokens_per_sec"] for m in bf16 if m in fp32
    }
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results, out)
    return results


def print_table(results: dict, out: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="each path through the trainer and through its reference (a plain torch loop, or DeepSpeed's engine "
        "with the same config): median step over blocks, p10-p90 of the steps as the host ended them; overhead of "
        "the medians, and the median of the per-round ratios (paired); host synchronisations per optimizer step "
        "(bench.json names where)",
        title_justify="left",
    )
    for column in (
        "path",
        "model",
        "precision",
        "side",
        "step ms",
        "p10-p90 ms",
        "tokens/s",
        "MFU",
        "peak GiB",
        "overhead",
        "paired",
        "syncs/step",
    ):
        table.add_column(column, justify="left" if column in ("path", "model", "precision", "side") else "right")
    for r in results["training"]:
        for side in ("trainer", "reference"):
            s = r[side]
            table.add_row(
                r["path"],
                r["model"],
                r["precision"],
                side if side == "trainer" else r["reference_kind"],
                f"{s['median_step_seconds'] * 1e3:,.1f}",
                f"{s['p10_step_seconds'] * 1e3:,.0f}-{s['p90_step_seconds'] * 1e3:,.0f}",
                f"{s['tokens_per_sec']:,.0f}",
                f"{s['mfu']:.1%}",
                f"{s['peak_memory_gib']:.2f}",
                f"{r['overhead_percent']:+.1f}%" if side == "trainer" else "",
                f"{r['overhead_percent_paired_median']:+.1f}%" if side == "trainer" else "",
                f"{s['host_syncs_per_step']:.2f}",
            )
    console = Console(width=max(Console().width, 110))
    console.print(table)
    for model, speedup in results["bf16_speedup"].items():
        console.print(f"bf16-mixed / 32-true tokens/s, {model}: {speedup:.2f}x")
    prep = results["data_preparation"]
    if "skipped" in prep:
        console.print(f"data preparation: skipped, {prep['skipped']}")
    else:
        console.print(
            f"data preparation ({prep['files']} files, GPT-2 tokenizer): make prepare "
            f"{prep['prepare']['tokens_per_sec']:,.0f} tokens/s on {prep['num_proc']} processes, a plain "
            f"loop {prep['plain_loop']['tokens_per_sec']:,.0f} tokens/s ({prep['speedup']:.2f}x)"
        )
    if results.get("distillation"):
        console.print(distill_line(results["distillation"]))
    peaks = {r["peak_flops_source"]: r["peak_flops"] for r in results["training"]}
    for source, flops in peaks.items():
        console.print(f"MFU against {flops / 1e12:,.2f} TFLOP/s ({source})")
    env = results["environment"]
    console.print(
        f"{env['cpu']}, {env['cpu_count']} cores, torch {env['torch']} ({env['torch_threads']} threads), "
        f"GPU: {env['gpu'] or 'none'}. Written: {out}"
    )


if __name__ == "__main__":
    from llm.__main__ import function_cli
    from llm.argv import with_make_args
    from llm.errors import ConfigError

    try:
        function_cli(
            bench, with_make_args(sys.argv[1:])
        )  # bad options get one line, as every `python -m llm` command's do
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
