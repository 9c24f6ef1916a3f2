"""The metrics people watch: read back from W&B's own offline log (`wandb leet inspect --json`) and
from metrics.csv, for a single-process run and a 2-process DeepSpeed run."""

from __future__ import annotations

import json
import math
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from llm.model import ModelConfig, count_params, flops_per_token
from llm.observe.metrics import CHARTS, STEP, TOKENS, X_AXES, logged_keys
from llm.observe.peaks import measure_matmul_peak
from llm.redact import scrub
from llm.tools.dashboard import build_workspace, panel_keys
from support import (
    FAKE_HF_TOKEN,
    FAKE_WANDB_KEY,
    REPO,
    RUN_ENV,
    STEPS,
    assert_refused,
    llm_here,
    metrics_rows,
    wandb_records,
)

KEYS = sorted(logged_keys())  # llm/observe/metrics.py: what every training run logs
W_AND_B_OWN = {"_runtime", "_step", "_timestamp", "epoch", STEP}  # what W&B and Lightning add to each row
TOKENS_PER_SAMPLE = 4 * 64  # support.CANONICAL_MODEL: micro-batch 4 of 64 tokens
VAL_ROWS = [3, 7, 11]  # validations after steps 4, 8 and 12, logged at the 0-based step


def wandb_runs(run: Path) -> list[Path]:
    return sorted((run / "wandb").glob("offline-run-*"))


def history(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def wandb_config(records: list[dict]) -> dict:
    config = {}
    for r in records:
        if r["type"] == "config":
            config.update(r["config"]["update"])
    return config


def csv_rows(run: Path) -> dict[int, dict]:
    return metrics_rows(run)


@pytest.fixture(params=["single", "zero2"])
def run(request, runs) -> Path:
    """The canonical one-process run and the 2-process ZeRO-2 run (tests/support.py)."""
    return runs(request.param)


@pytest.mark.slow
def test_every_metric_reaches_wandb_with_plausible_values(run):
    (wandb_run,) = wandb_runs(run)
    items = history(wandb_records(wandb_run))
    logged = {k for item in items for k in item} - W_AND_B_OWN
    assert set(KEYS) <= logged, f"missing from W&B: {sorted(set(KEYS) - logged)}"
    assert logged <= set(KEYS), f"logged but not declared in llm/observe/metrics.py: {sorted(logged - set(KEYS))}"
    for item in items:
        if "perf/tokens_per_sec" in item:
            assert item["perf/tokens_per_sec"] > 0 and item["perf/samples_per_sec"] > 0 and item["perf/step_time"] > 0
            assert 0 < item["perf/mfu"] < 1 and 0 <= item["perf/data_wait_frac"] < 1
            assert item["perf/tokens_per_sec"] == pytest.approx(item["perf/tokens_per_sec_per_device"] * world(run))
            for name in ("allocated", "reserved", "peak", "host_rss"):
                assert 0 < item[f"mem/{name}_min"] <= item[f"mem/{name}_max"] < 64  # GiB
            assert math.isfinite(item["train/loss"]) and 0 < item["train/grad_norm"] < 100
            assert item["train/tokens"] == item["trainer/global_step"] * TOKENS_PER_SAMPLE * world(run)
        if "val/loss" in item:
            assert math.isfinite(item["val/loss"]) and item["val/ppl"] == pytest.approx(math.exp(item["val/loss"]))
            assert 0 < item["val/bpb"] < item["val/loss"] / math.log(2)  # several bytes per token


def world(run: Path) -> int:
    return json.loads((run / "summary.json").read_text())["world_size"]


@pytest.mark.slow
def test_metrics_csv_holds_what_wandb_received(run):
    (wandb_run,) = wandb_runs(run)
    rows = csv_rows(run)
    items: dict[int, dict] = {}  # W&B keeps the training and the validation metrics of a step apart
    for item in history(wandb_records(wandb_run)):
        items.setdefault(int(item["trainer/global_step"]), {}).update(item)
    assert sorted(items) == sorted(rows) == list(range(1, STEPS + 1))  # every step logged: the same rows in both
    for step, item in items.items():
        logged = {k for k, v in rows[step].items() if v and k in KEYS}
        assert logged == set(KEYS) & set(item), f"step {step}"
        for key in logged:
            assert float(rows[step][key]) == pytest.approx(item[key], rel=1e-6), key


@pytest.mark.slow
def test_wandb_run_metadata_summary_and_model_artifact(run):
    (wandb_run,) = wandb_runs(run)
    records = wandb_records(wandb_run)
    (header,) = [r["run"] for r in records if r["type"] == "run"]
    world_size, ds = (2, "zero2") if world(run) == 2 else (1, "none")
    assert header["tags"] == ["model:tiny", f"ds:{ds}", "precision:32-true", f"world:{world_size}"]
    assert header["job_type"] == "train" and header["run_group"] == "default" and header["display_name"] == run.name
    assert header["project"] == "llm-tests" and header["entity"] == "a-team"
    assert wandb_config(records)["model_preset"] == "tiny"
    (val_loss,) = [r["metric"] for r in records if r["type"] == "metric" and r["metric"].get("name") == "val/loss"]
    assert val_loss["summary"] == {"min": True, "last": True} and val_loss["step_metric"] == STEP
    summary = json.loads((run / "summary.json").read_text())
    final = {}
    for r in records:
        if r["type"] == "summary":
            final.update(r["summary"]["update"])
    assert {k: final[k] for k in summary} == summary  # summary.json mirrored
    assert final["val/loss"]["min"] == min(float(r["val/loss"]) for r in csv_rows(run).values() if r.get("val/loss"))
    (artifact,) = [r["artifact"] for r in records if r["type"] == "artifact"]
    assert artifact["name"] == f"{run.name}-model" and artifact["type"] == "model"
    files = sorted(c["path"] for c in artifact["manifest"]["contents"])
    weights = ["step-000012.ckpt"] if world_size == 1 else []  # --wandb_log_model=true in the single run only
    assert files == sorted(["config.yaml", "summary.json", "tokenizer.json", *weights])


@pytest.mark.slow
def test_dashboard_panels_show_keys_a_real_run_logged(runs):
    (wandb_run,) = wandb_runs(runs("single"))
    logged = {k for item in history(wandb_records(wandb_run)) for k in item}
    for x in X_AXES:
        workspace = build_workspace("a-team", "llm-tests", x)  # built offline; nothing is sent
        # distillation's and benchmarks' panels show keys those runs log (test_distill.py, test_in_loop_eval.py)
        patterns = {c.pattern for c in CHARTS if c.pattern}
        keys = panel_keys(workspace) - (logged_keys("distill", "benchmarks") - logged_keys()) - patterns
        assert keys <= logged, sorted(keys - logged)
        sections = {s.name for s in workspace.sections}
        assert sections == {"Loss", "Optimizer", "Throughput", "Memory", "Distillation", "Benchmarks"}
        assert workspace.settings.x_axis == X_AXES[x] and {p.x for s in workspace.sections for p in s.panels} == {
            X_AXES[x]
        }
        workspace._to_model()  # the saved form builds, as `save` would send it
    # every validation row carries the tokens trained so far, so val/ charts work with tokens on x
    assert all(TOKENS in item for item in history(wandb_records(wandb_run)) if "val/loss" in item)


def test_wandb_dashboard_offline_refuses_in_one_line(tmp_path):
    # what make wandb-dashboard runs, in this process
    result = llm_here("wandb-dashboard", env={"WANDB_MODE": "offline", "HOME": str(tmp_path)})
    assert_refused(result, "wandb-dashboard: W&B is offline", "set WANDB_API_KEY")


@pytest.mark.slow
def test_wandb_config_is_the_resolved_config_and_holds_no_secret(run):
    (wandb_run,) = wandb_runs(run)
    config = wandb_config(wandb_records(wandb_run))
    # support.CANONICAL_MODEL, and what it makes, written out: 2 blocks of 198,272 parameters (norms
    # 2 x 256, attention 49,536 + 16,512, MLP 66,048 + 65,664), a tied 512 x 128 embedding, 64 x 128
    # positions and the final norm; 6 x (N - positions) + 12 x 2 layers x 2 heads x 64 x 64 tokens
    assert config["model"]["config"]["n_embd"] == 128 and config["model"]["config"]["vocab_size"] == 512
    assert config["params"] == 470_528 and config["flops_per_token"] == 2_970_624
    assert config["world_size"] == world(run) and config["trainer"]["max_steps"] == STEPS
    assert config["strategy"] == ("deepspeed zero2" if world(run) == 2 else "single_device")
    for path in [*run.rglob("*")]:
        if path.is_file():
            data = path.read_bytes()
            assert FAKE_HF_TOKEN.encode() not in data and FAKE_WANDB_KEY.encode() not in data, path


def test_scrub_removes_secrets_by_name_and_by_shape():
    data = {"hf_token": "y", "tokenizer": "gpt2/tokenizer.json", "eot_token": "<|endoftext|>", "text": FAKE_HF_TOKEN}
    config = {"wandb_api_key": "x", "data": data, "list": [FAKE_WANDB_KEY]}
    kept = {"tokenizer": "gpt2/tokenizer.json", "eot_token": "<|endoftext|>"}
    assert scrub(config) == {
        "wandb_api_key": "<redacted>",
        "data": {"hf_token": "<redacted>", **kept, "text": "<redacted>"},
        "list": ["<redacted>"],
    }


@pytest.mark.slow
@pytest.mark.parametrize("breakage", ["bad mode", "unwritable dir"])
def test_training_goes_on_when_wandb_cannot_start(tmp_path, runs, breakage):
    run = tmp_path / "run"
    env, extra = dict(RUN_ENV), ["--trainer.max_steps=2", "--eval_every=2"]
    if breakage == "bad mode":
        env["WANDB_MODE"] = "sideways"
    else:
        run.mkdir()
        (run / "wandb").write_text("a file where W&B wants its folder")
        extra.append("--resume=auto")
    result = llm_here(*runs.args(run, *extra, probes=()), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("W&B failed") == 1
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert any(r.get("perf/tokens_per_sec") for r in csv_rows(run).values())


def test_flops_per_token_by_hand():
    config = ModelConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=8)
    # per block: 2 LayerNorms 2·16, q and out projections 2·(64+8), keys and values 128+16, MLP 256+32 and 256+8
    block = 2 * 16 + 2 * 72 + 144 + 288 + 264
    n = 100 * 8 + 2 * block + 16  # tied embedding once, final norm; the 16 x 8 position table is not counted
    assert count_params(config) == n + 16 * 8
    assert flops_per_token(config) == 6 * n + 12 * 2 * 2 * 4 * 16 == 18432


@pytest.mark.slow
@pytest.mark.parametrize("name", ["single", "ddp"])
def test_mfu_is_achieved_flops_over_peak(runs, name):
    run = runs(name)  # the DDP run was given --peak_flops=2e9; the single one measured its CPU
    summary = json.loads((run / "summary.json").read_text())
    peak = {"ddp": 2e9}.get(name, summary["peak_flops"])
    source = summary["peak_flops_source"]
    assert source == "--peak_flops" if name == "ddp" else source.startswith("cpu, measured"), source
    config = ModelConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=128)
    rows = [r for r in csv_rows(run).values() if r.get("perf/mfu")]
    assert len(rows) >= STEPS - 2
    for row in rows:
        expected = float(row["perf/tokens_per_sec_per_device"]) * flops_per_token(config) / peak
        assert float(row["perf/mfu"]) == pytest.approx(expected, rel=1e-5)
    torch = __import__("torch")
    assert 1e8 < measure_matmul_peak(torch.device("cpu"), torch.float32, n=256) < 1e14  # FLOP/s: a CPU, measured


@pytest.mark.long  # make plot in a process of its own (matplotlib); what it draws is tested in-process below
def test_make_plot_writes_png_charts(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs("single"), run, symlinks=True)
    result = subprocess.run(["make", "-s", "plot", f"RUN={run}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("loss", "optimizer", "throughput", "memory", "overview"):
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name


def test_plot_draws_every_logged_series_with_its_values(runs, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llm.tools.plot import plot

    run = tmp_path / "run"
    shutil.copytree(runs("single"), run, symlinks=True)
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep each figure as plot() leaves it
    plot(str(run))
    sections = {ax.get_title(): ax for figure in figures[:-1] for ax in figure.axes}  # the last is the overview
    rows = csv_rows(run)
    assert not any(chart.title in sections for chart in CHARTS if chart.only)  # no distillation, no benchmarks
    for chart in (c for c in CHARTS if c.only is None):
        drawn = {line.get_label(): line for line in sections[chart.title].get_lines()}
        for key, legend in chart.series:
            # x is steps done, as metrics.csv counts them: 12 steps logged, validations after steps 4, 8
            # and 12, saves after every second step
            steps = [s for s in sorted(rows) if key in rows[s]]
            assert len(steps) == (3 if key.startswith("val/") else 6 if key == "perf/save_seconds" else STEPS), key
            assert steps[-1] == STEPS and (not key.startswith("val/") or steps == [4, 8, 12]), key
            assert list(drawn[legend].get_xdata()) == steps, key
            assert list(drawn[legend].get_ydata()) == pytest.approx([float(rows[s][key]) for s in steps]), key


@pytest.mark.long  # a terminal and W&B's viewer (8 s of make test's 10 minutes)
def test_make_tui_opens_the_run_in_a_terminal(runs):
    single = runs("single")
    pid, fd = pty.fork()
    if pid == 0:  # the child: make, as a user at a terminal types it
        os.chdir(REPO)
        os.environ["TERM"] = "xterm-256color"
        os.execvp("make", ["make", "-s", "tui", f"RUN={single}"])
    screen, deadline = b"", time.time() + 60
    while time.time() < deadline and b"mem/" not in screen:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                screen += os.read(fd, 65536)
            except OSError:
                break
    os.write(fd, b"q")
    time.sleep(0.5)
    os.killpg(os.getpgid(pid), signal.SIGTERM) if _alive(pid) else None
    text = re.sub(rb"\x1b\[[0-9;?<>]*[a-zA-Z]", b"", screen).decode(errors="replace")
    assert "offline-run" in text and "mem/" in text, text[-2000:]


def _alive(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return False


@pytest.mark.bench
def test_make_bench_quick_writes_json(tmp_path, gpt2_tokenizer):  # bench's data preparation uses the GPT-2 tokenizer
    out = tmp_path / "bench.json"
    args = f"ARGS=--quick=true --out={out} --paths=[eager,compiled,zero2]"
    result = subprocess.run(["make", "-s", "bench", args], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    bench = json.loads(out.read_text())
    rows = {(r["path"], r["precision"]): r for r in bench["training"]}
    assert set(rows) == {(p, q) for p in ("eager", "compiled", "zero2") for q in ("32-true", "bf16-mixed")}
    assert bench["settings"]["accumulation"] == 2  # quick: 2 micro-batches per optimizer step (8 otherwise)
    for (path, _), r in rows.items():
        assert r["reference_kind"] == ("deepspeed engine" if path == "zero2" else "torch loop")
        assert r["compile"] is (path == "compiled") and r["deepspeed"] == ("zero2" if path == "zero2" else None)
        assert r["accumulation"] == 2 and r["tokens_per_step"] == r["batch"] * r["block_size"] * 2
        for side in ("trainer", "reference"):
            assert r[side]["median_step_seconds"] > 0 and r[side]["tokens_per_sec"] > 0 and 0 < r[side]["mfu"] < 1
            each = r[side]["host_syncs_each_step"]  # the measured steps 3, 4 and 5, none a logging step
            assert len(each) == 3 and sum(each) / 3 == pytest.approx(r[side]["host_syncs_per_step"])
            assert sum(r[side]["host_syncs"].values()) == pytest.approx(r[side]["host_syncs_per_step"])
        # between logging steps the trainer waits for the device no more than its reference does: not
        # at all on the plain paths, only DeepSpeed's own waits under ZeRO
        trainer, reference = r["trainer"]["host_syncs_each_step"], r["reference"]["host_syncs_each_step"]
        assert trainer == reference, (path, r["trainer"]["host_syncs"], r["reference"]["host_syncs"])
        assert reference == ([0, 0, 0] if path != "zero2" else [reference[0]] * 3) and (path != "zero2" or reference[0])
        assert r["ratio_trainer_to_reference"] == pytest.approx(
            r["trainer"]["median_step_seconds"] / r["reference"]["median_step_seconds"]
        )
        assert r["peak_flops_source"].startswith("cpu, measured")
    assert bench["environment"]["torch"] and set(bench["bf16_speedup"]) == {"tiny"}
    tiny = {p: rows[("eager", p)]["trainer"]["tokens_per_sec"] for p in ("32-true", "bf16-mixed")}
    assert bench["bf16_speedup"]["tiny"] == pytest.approx(tiny["bf16-mixed"] / tiny["32-true"])
    prep = bench["data_preparation"]  # both sides tokenized the same 120 documents
    assert prep["files"] == 120 and prep["prepare"]["tokens"] == prep["plain_loop"]["tokens"] > 100_000
    assert "each path through the trainer and through its reference" in result.stdout
    d = bench["distillation"]  # the tiny model's step with the 10m teacher, against without
    assert d["distilled_step_seconds"] > d["plain_step_seconds"] > 0 and d["teacher_params"] > d["student_params"]
    assert d["measured_ratio"] == pytest.approx(d["distilled_step_seconds"] / d["plain_step_seconds"])
    assert d["predicted_ratio"] > 1 and "distillation (32-true)" in result.stdout
