"""--model.float8=tensorwise|rowwise: the Transformer blocks' linear layers train with float8
matmuls, through torchao's float8 training (convert_to_float8_training).

The layers are swapped for torchao's Float8Linear where the model is built, before torch.compile,
which float8 needs to be fast. Their parameters stay what they were (the same names, the same
dtype): checkpoints, export and sample are as without float8. Float8 matmuls need a GPU of
compute capability 8.9 or newer (H100, H200, L4); `--model.float8_emulate=true` runs them
emulated in higher precision, anywhere, which is slow and is for tests.

Which layers: torchao's own filter for the recipe (dimensions divisible by 16, and large enough to
gain on an H100: small matmuls are slower in float8, with the casts); emulated, every layer whose
dimensions are divisible by 16, so that a small model is converted too. The output layer stays
in the training precision, as torchtitan's recipes keep it.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from llm import compat

KEEP = ["lm_head"]  # module names never converted


def convert(model: nn.Module, recipe: str, emulate: bool) -> list[str]:
    """Swap the chosen nn.Linear layers of `model` for Float8Linear, in place; their names."""
    compat.quiet_torchao()
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    if emulate:
        config = dataclasses.replace(config, emulate=True)
        chosen = divisible_by_16
    else:
        chosen = compat.float8_layer_filter(recipe, KEEP)
    converted: list[str] = []

    def take(module: nn.Module, name: str) -> bool:
        if name.split(".")[-1] in KEEP or not chosen(module, name):
            return False
        converted.append(name)
        return True

    convert_to_float8_training(model, module_filter_fn=take, config=config)
    return converted


def divisible_by_16(module: nn.Module, name: str) -> bool:
    """What float8 matmuls need of a layer's shape, and nothing about its size."""
    return isinstance(module, nn.Linear) and all(d % 16 == 0 for d in module.weight.shape)
