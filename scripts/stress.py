"""`make stress`: the 2-process ZeRO-2 CPU path, many times in a row, each run bounded in time.

A distributed run that hangs now and then is found only by running it often. Each run trains a
tiny model for a few steps with `--collective_timeout` (so a stuck collective ends it with the
project's one line) and a wall-clock bound on top; a run that outlives the bound has the Python
stacks of all its processes printed (py-spy) before it is killed. Prints one line per run and
exits non-zero if any run failed or hung.

    make stress STRESS_RUNS=20 [ARGS="--deepspeed=zero3 --bound=300"]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llm.argv import with_make_args

REPO = Path(__file__).resolve().parents[1]
MODEL = [
    "--model.config.n_layer=2",
    "--model.config.n_head=2",
    "--model.config.n_embd=64",
    "--model.config.block_size=64",
    "--data.batch_size=4",
    "--data.val_batches=2",
    "--data.num_workers=0",
    "--data.vocab_size=512",
    "--trainer.log_every_n_steps=1",
    "--eval_every=3",
    "--trainer.max_steps=6",
]


def corpus(folder: Path) -> Path:
    """~400 kB of the standard library's source: quick to prepare, on every machine."""
    import email
    import json

    path = folder / "corpus.txt"
    files = [Path(json.__file__).parent / n for n in ("decoder.py", "encoder.py")]
    files += sorted(Path(email.__file__).parent.glob("*.py"))
    path.write_text("\n\n".join(f.read_text() for f in files))
    return path


def stacks(pid: int) -> str:
    """The Python stacks of a process and its children, as py-spy reads them from outside."""
    py_spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if not py_spy:
        return "(py-spy is not installed: no stacks)"
    import psutil

    out = []
    for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        dump = subprocess.run([py_spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True, timeout=60)
        out.append(f"--- pid {proc.pid}: {' '.join(proc.cmdline()[:4])}\n{dump.stdout}{dump.stderr}")
    return "\n".join(out)


def one_run(index: int, root: Path, text: Path, extra: list[str], bound: float, timeout: float) -> tuple[str, float]:
    run = root / f"run{index}"
    command = [sys.executable, "-m", "llm", "fit", "--config", "configs/experiment/default.yaml", *MODEL]
    command += [f"--data.text={text}", f"--data.cache_dir={root / 'data'}", f"--run={run}"]
    command += ["--trainer.devices=2", f"--collective_timeout={timeout}", *extra]
    log = open(root / f"run{index}.log", "w")  # closed below, after the process
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = process.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        print(f"run {index}: no end after {bound:.0f} s; the stacks of its processes:\n{stacks(process.pid)}")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        code = None
    finally:
        log.close()
    seconds = time.monotonic() - started
    if code is None:
        return "hung", seconds
    if code != 0:
        tail = (root / f"run{index}.log").read_text()[-3000:]
        print(f"run {index}: exit status {code}:\n{tail}")
        return "failed", seconds
    return "ok", seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--deepspeed", default="zero2", help="the preset of every run")
    parser.add_argument("--bound", type=float, default=240.0, help="seconds a run may take before it counts as hung")
    parser.add_argument("--collective_timeout", type=float, default=60.0)
    a = parser.parse_args(with_make_args(sys.argv[1:]))  # make's ARGS=, taken out of the runs' environment
    with tempfile.TemporaryDirectory(prefix="llm-stress-") as tmp:
        root = Path(tmp)
        text = corpus(root)
        extra = [f"--deepspeed={a.deepspeed}"] if a.deepspeed else []
        results = []
        for index in range(1, a.runs + 1):
            outcome, seconds = one_run(index, root, text, extra, a.bound, a.collective_timeout)
            results.append((outcome, seconds))
            print(f"run {index}/{a.runs}: {outcome} in {seconds:.1f} s", flush=True)
    times = [s for o, s in results if o == "ok"]
    bad = [o for o, _ in results if o != "ok"]
    spread = f"median {statistics.median(times):.1f} s, max {max(times):.1f} s" if times else "no run finished"
    print(f"stress: {len(times)}/{a.runs} runs of 2 processes ({a.deepspeed or 'ddp'}) finished; {spread}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
