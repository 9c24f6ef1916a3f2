"""make export QUANT=: torchao-quantized transformers folders, loaded without this project and
compared here, independently of the figures the export prints, with the unquantized export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from support import LLAMA, assert_refused, llm_here

pytestmark = pytest.mark.xdist_group("quantize")

# measured by LOAD_AND_COMPARE on the canonical Llama (2 steps), 8 blocks of 64 tokens of the corpus:
# int8 KL 5.9e-7 nats per token, top-1 100%; int4 KL 1.6e-4, top-1 97.7% (the export's own figures
# on the run's validation blocks: 6.0e-7 and 99.8%; 1.7e-4 and 95.9%). Bounds: about 10x on the KL
BOUNDS = {"int8": {"kl": 1e-5, "top1": 0.99}, "int4": {"kl": 2e-3, "top1": 0.9}}
WEIGHT_TYPES = {"int8": "Int8Tensor", "int4": "IntxUnpackedToInt8Tensor"}

# run as `python -I` in an empty folder: transformers and torchao only; it says whether any module of
# this project was imported on the way
LOAD_AND_COMPARE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
plain_dir, text_file, *quantized = sys.argv[1:]
ids = AutoTokenizer.from_pretrained(plain_dir)(open(text_file).read()[:20000])["input_ids"]
blocks = torch.tensor(ids[: 8 * 64]).view(8, 64)
result = {}
with torch.no_grad():
    p = AutoModelForCausalLM.from_pretrained(plain_dir).eval()(blocks).logits.log_softmax(-1)
    for folder in quantized:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        q = model(blocks).logits.log_softmax(-1)
        result[folder] = {
            "kl": (p.exp() * (p - q)).sum(-1).mean().item(),
            "top1": (p.argmax(-1) == q.argmax(-1)).float().mean().item(),
            "weight": type(model.model.layers[0].mlp.down_proj.weight).__name__,
        }
result["project_imported"] = sorted(m for m in sys.modules if m == "llm" or m.startswith("llm."))
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def llama(runs, tmp_path_factory):
    """The canonical Llama run's checkpoint, its plain export, and its int8 and int4 exports."""
    run = runs("llama", *LLAMA, "--trainer.max_steps=2", probes=(), here=True)
    ckpt, root = run / "checkpoints" / "last.ckpt", tmp_path_factory.mktemp("quantized")
    folders = {"plain": root / "plain", "int8": root / "int8", "int4": root / "int4"}
    answers = {}
    for name, folder in folders.items():
        quant = [] if name == "plain" else [f"--quant={name}"]
        answers[name] = answer = llm_here("export", f"--ckpt={ckpt}", f"--out={folder}", *quant)
        assert answer.returncode == 0, answer.stderr[-3000:]
    return ckpt, folders, answers


@pytest.fixture(scope="module")
def compared(llama, code_corpus, tmp_path_factory):
    _, folders, _ = llama
    empty = tmp_path_factory.mktemp("elsewhere")
    args = [str(folders["plain"]), str(code_corpus), str(folders["int8"]), str(folders["int4"])]
    done = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_AND_COMPARE, *args], cwd=empty, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_quantized_export_loads_without_the_project_and_stays_close(llama, compared, quant):
    _, folders, _ = llama
    measured = compared[str(folders[quant])]
    assert compared["project_imported"] == []
    assert measured["weight"] == WEIGHT_TYPES[quant]  # torchao's quantized tensor, not a float weight
    assert measured["kl"] < BOUNDS[quant]["kl"] and measured["top1"] >= BOUNDS[quant]["top1"], measured


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_the_quantized_linear_weights_take_under_a_third_of_their_fp32_bytes(llama, quant):
    _, folders, _ = llama

    def tensors(folder: Path) -> dict:
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # safe_open has no iterator

    plain, quantized = tensors(folders["plain"]), tensors(folders[quant])
    layers = {key.rsplit(".", 1)[0] for key in quantized if key.endswith("._weight_qdata")}
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up and down of each of the 2 blocks
    for layer in layers:
        stored = sum(t.numel() * t.element_size() for k, t in quantized.items() if k.startswith(f"{layer}._weight_"))
        fp32 = plain[f"{layer}.weight"].numel() * 4
        assert stored <= 0.3 * fp32, (layer, stored, fp32)
    assert quantized["model.embed_tokens.weight"].dtype == plain["model.embed_tokens.weight"].dtype  # kept


def test_the_export_prints_and_records_what_it_measured(llama, compared):
    _, folders, answers = llama
    printed = answers["int8"].stdout
    kl = float(re.search(r"mean KL divergence (\S+) nats per token", printed).group(1))
    top1 = float(re.search(r"top-1 agreement ([\d.]+)%", printed).group(1)) / 100
    assert "the run's 8 validation blocks" in printed  # val_batches 2 x batch 4 x 1 process
    assert kl < BOUNDS["int8"]["kl"] and top1 >= BOUNDS["int8"]["top1"]
    before, after = map(float, re.search(r"bits per byte ([\d.]+) -> ([\d.]+)", printed).groups())
    assert abs(after - before) < 0.01 and before > 0
    for folder in (folders["plain"], folders["int8"]):  # the weights as readable as the folder's other files
        assert (folder / "model.safetensors").stat().st_mode == (folder / "config.json").stat().st_mode
    card = (folders["int8"] / "README.md").read_text()
    assert "int8 (torchao" in card and "mean KL divergence" in card
    assert json.loads((folders["int8"] / "config.json").read_text())["quantization_config"]["quant_method"] == "torchao"


@pytest.mark.parametrize(
    "quant, answer",
    [
        ("fp8", "quant=fp8: float8 needs a GPU of compute capability 8.9 or newer"),
        ("int3", "quant=int3: unknown; use int8, int4 or fp8"),
    ],
)
def test_a_quantization_this_machine_cannot_do_is_refused_and_writes_nothing(llama, tmp_path, quant, answer):
    ckpt, _, _ = llama
    assert_refused(llm_here("export", f"--ckpt={ckpt}", f"--out={tmp_path}/out", f"--quant={quant}"), answer)
    assert not (tmp_path / "out").exists()


def test_a_gpt2_is_not_quantized_because_its_projections_are_conv1d(runs, tmp_path):
    ckpt = runs("single") / "checkpoints" / "last.ckpt"
    answer = llm_here("export", f"--ckpt={ckpt}", f"--out={tmp_path}/out", "--quant=int8")
    assert_refused(answer, "is a GPT-2", "Conv1D, which torchao does not quantize")
    assert not (tmp_path / "out").exists()


def test_eval_of_an_exported_folder_gives_its_checkpoints_loss_and_the_quantized_change(llama, code_corpus):
    ckpt, folders, _ = llama
    losses = {}
    for name, target in (("checkpoint", ckpt), ("plain", folders["plain"]), ("int8", folders["int8"])):
        answer = llm_here("eval", f"--ckpt={target}", f"--text={code_corpus}", "--max_batches=4", "--json=true")
        assert answer.returncode == 0, answer.stderr[-3000:]
        losses[name] = json.loads(answer.stdout.splitlines()[-1])["loss"]
    assert losses["plain"] == pytest.approx(losses["checkpoint"], abs=1e-5)  # the same model, through transformers
    assert losses["int8"] == pytest.approx(losses["plain"], abs=1e-3) and losses["int8"] != losses["plain"]
    answer = llm_here("eval", f"--ckpt={folders['int8']}")
    assert_refused(answer, "a transformers folder records no run's validation data; give TEXT= or HF=")


def test_a_checkpoint_outside_its_run_folder_is_quantized_without_reading_its_data(llama, tmp_path):
    # a checkpoint's data paths are followed only inside its run folder: elsewhere, sizes only
    ckpt, _, _ = llama
    moved = tmp_path / "moved.ckpt"
    shutil.copy(ckpt, moved)
    answer = llm_here("export", f"--ckpt={moved}", f"--out={tmp_path / 'out'}", "--quant=int8")
    assert answer.returncode == 0, answer.stderr[-3000:]
    assert "not measured against the unquantized export: the checkpoint lies outside a run folder" in answer.stdout
    assert "KL" not in (tmp_path / "out" / "README.md").read_text()


def test_a_quantized_export_measures_on_the_run_folders_data_not_the_checkpoints(llama, tmp_path):
    # as make eval: the data paths inside a checkpoint in a run folder are not followed (test_bad_input.py)
    import torch

    from llm.config import datamodule_args

    ckpt, _, _ = llama
    run = tmp_path / "run"
    shutil.copytree(ckpt.parent.parent, run, symlinks=True)
    secret, evil = tmp_path / "id_rsa", tmp_path / "evilcache"
    secret.write_text("x" * 4000)
    saved = (run / "checkpoints" / "last.ckpt").resolve()
    contents = torch.load(saved, weights_only=False)
    datamodule_args(contents["llm_config"]["data"]).update(text=str(secret), cache_dir=str(evil))
    saved.unlink()
    torch.save(contents, saved)
    answer = llm_here("export", f"--ckpt={saved}", f"--out={tmp_path / 'out'}", "--quant=int8")
    assert_refused(answer, f"its data.text ({secret}) is not its run folder's")
    assert not evil.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--distill.teacher", "--model.init"])
def test_a_quantized_export_as_teacher_or_start_is_refused_before_any_preparation(llama, runs, tmp_path, option):
    _, folders, _ = llama
    cache = tmp_path / "data"
    args = runs.args(tmp_path / "run", f"--data.cache_dir={cache}", f"{option}={folders['int8']}", probes=())
    field = option.removeprefix("--")
    assert_refused(llm_here(*args), f"{field}={folders['int8']}: a quantized export (torchao)", "unquantized one")
    assert not cache.exists() and not (tmp_path / "run").exists()


def test_a_kl_below_what_float64_resolves_is_printed_as_such_never_negative(llama, tmp_path):
    """Two exports a rounding apart (one weight moved by 1e-7): their KL is of the order of 1e-14,
    below what float32 log-probabilities resolve, where a negative mean was once printed."""
    import torch
    from safetensors.torch import load_file, save_file

    from llm.tools import quantize
    from llm.tools.export import quantized_lines

    _, folders, _ = llama
    nudged = tmp_path / "nudged"
    shutil.copytree(folders["plain"], nudged)
    tensors = load_file(str(nudged / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1e-7
    save_file(tensors, str(nudged / "model.safetensors"), metadata={"format": "pt"})
    blocks = [torch.randint(0, 512, (4, 65), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    measured = quantize.compare(folders["plain"], nudged, blocks, tokens=1000, nbytes=3000, quant="int8")
    assert 0 <= measured["kl"] < 1e-10, measured
    lines = quantized_lines({**measured, "quant": "int8", "bytes": 1, "bytes_unquantized": 1, "evaluated": "x"})
    assert re.search(r"mean KL divergence (below 1e-12|\d\.\d+e-1[1-9]) nats per token", lines), lines
