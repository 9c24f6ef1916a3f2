"""--model.float8: torchao's float8 training, emulated on the CPU (the matmuls' float8 rounding of
inputs and weights is real; only the matmul itself runs in higher precision)."""

from __future__ import annotations

import json

import pytest

from llm.checkpointing.files import Checkpoint
from llm.model import ModelConfig, Transformer
from llm.preflight.resolve import FLOAT8_RECIPES
from llm.train import float8
from support import STEPS, assert_refused, llm_here, losses

pytestmark = pytest.mark.xdist_group("float8")

# measured: the canonical run's 12 losses (about 6.2 to 5.6), float8 tensorwise emulated against
# without, differ by 0.00003 to 0.0029 (relative 5e-4 at most); the bound leaves 3.5x
TOLERANCE = 0.01


@pytest.fixture(scope="module")
def float8_run(runs):
    return runs("float8", "--model.float8=tensorwise", "--model.float8_emulate=true", probes=())


@pytest.mark.parametrize("recipe", FLOAT8_RECIPES)
def test_the_block_linears_are_converted_and_the_weights_keep_their_names(recipe):
    from torchao.float8.float8_linear import Float8Linear

    config = ModelConfig(n_layer=2, n_head=2, n_embd=128, block_size=64, vocab_size=512)
    model = Transformer(config)
    names = set(model.state_dict())
    converted = float8.convert(model, recipe, emulate=True)
    layers = ("attn.qkv_proj", "attn.out_proj", "mlp.up_proj", "mlp.down_proj")
    assert converted == [f"blocks.{i}.{layer}" for i in range(2) for layer in layers]
    assert all(isinstance(model.get_submodule(name), Float8Linear) for name in converted)
    assert not isinstance(model.lm_head, Float8Linear)  # the output layer stays in the training precision
    assert set(model.state_dict()) == names


@pytest.mark.slow  # a training run of its own
def test_a_float8_run_trains_as_the_plain_one_does_and_its_checkpoint_is_an_ordinary_one(runs, float8_run, tmp_path):
    plain, converted = losses(runs("single")), losses(float8_run)
    assert len(converted) == STEPS and converted.keys() == plain.keys()
    assert max(abs(converted[s] - plain[s]) for s in plain) < TOLERANCE, (plain, converted)
    assert converted != plain  # it did run in float8: the rounding shows
    summary = json.loads((float8_run / "summary.json").read_text())
    assert summary["float8"] == "tensorwise (emulated), 8 layers"
    ckpt = float8_run / "checkpoints" / "last.ckpt"
    state = Checkpoint(ckpt).read()["state_dict"]
    assert set(state) == set(Checkpoint(runs("single") / "checkpoints" / "last.ckpt").read()["state_dict"])
    assert llm_here("export", f"--ckpt={ckpt}", f"--out={tmp_path / 'hf'}").returncode == 0
    sampled = llm_here("sample", f"--ckpt={ckpt}", "--prompt=def ", "--max_new_tokens=8")
    assert sampled.returncode == 0 and sampled.stdout.startswith("def ")


def test_float8_without_a_gpu_for_it_is_refused_with_the_emulation_flag_named(tmp_path):
    config = "--config=configs/experiment/default.yaml"
    answer = llm_here("fit", config, "--model.float8=rowwise", f"--run={tmp_path}/run", "--trainer.max_steps=1")
    assert_refused(answer, "model.float8=rowwise: float8 matmuls need a GPU of compute capability 8.9", "emulate")
    assert not (tmp_path / "run").exists()
