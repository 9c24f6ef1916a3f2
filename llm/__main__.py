"""`python -m llm <command>`: fit | prepare | sample (see `make help`)."""

import os
import sys

# Transparent huge pages for torch's large CPU tensors: far fewer page faults when the logits of a
# 50k vocabulary are allocated every step (1.4x faster steps measured on a 2-core CPU). Read once,
# when torch first allocates, so it is set before torch is imported.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

from llm.errors import ConfigError  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed would pick, without its warning

COMMANDS = {
    "fit": "train (LightningCLI; --help lists every option)",
    "prepare": "prepare and cache the data of a config",
    "sample": "generate text from a checkpoint",
    "eval": "validation loss, perplexity and bits per byte of a checkpoint",
    "export-fp32": "consolidate a DeepSpeed checkpoint folder into one fp32 file",
    "plan": "memory per ZeRO stage and offload for a model and cluster, and the preset to use",
}


def function_cli(function, args: list[str]) -> None:
    """A command from a function's signature and docstring (jsonargparse), with one-line errors."""
    from jsonargparse import ArgumentParser, auto_cli

    from llm.errors import OneLineErrors

    class Parser(OneLineErrors, ArgumentParser):
        pass

    auto_cli(function, args=args, parser_class=Parser, as_positional=False)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m llm {" + ",".join(COMMANDS) + "} [options]", file=sys.stderr)
        for name, what in COMMANDS.items():
            print(f"  {name:<12} {what}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *argv]
    command, args = argv[0], argv[1:]
    sys.stdout.reconfigure(errors="replace")
    try:
        if command == "fit":
            from llm.cli import fit_main

            fit_main()
        elif command == "prepare":
            from llm.cli import prepare_main

            prepare_main()
        elif command == "sample":
            from llm.generate import sample

            function_cli(sample, args)
        elif command == "eval":
            from llm.evaluate import evaluate

            function_cli(evaluate, args)
        elif command == "export-fp32":
            from llm.checkpoint import export_fp32

            function_cli(export_fp32, args)
        elif command == "plan":
            from llm.plan import plan_main

            function_cli(plan_main, args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
