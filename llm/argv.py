"""Make's ARGS=: further options handed over in the environment (LLM_ARGS), split into words as a
shell splits them (quotes group, `$` and backquotes stay text), so that nothing in them is run."""

from __future__ import annotations

import os
import shlex

from llm import handoff
from llm.errors import ConfigError


def with_make_args(argv: list[str]) -> list[str]:
    """`argv` and then the words of LLM_ARGS, which is removed: the processes a launcher starts get
    the words in their argv, not a second time from the environment."""
    text = os.environ.pop(handoff.ARGS, "")
    try:
        return [*argv, *shlex.split(text)]
    except ValueError as exc:  # an unbalanced quote
        raise ConfigError(f"ARGS={text}: {exc}; quote a value with spaces as '--key=a b' or \"--key=a b\"") from None
