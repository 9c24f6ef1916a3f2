"""Files written whole or not at all: the text goes to a temporary file beside the target, which then
replaces it in one step, so that a crash or a full disk leaves the old file (or none), never half of one."""

from __future__ import annotations

import os
from pathlib import Path


def write_text(path: Path, text: str, shared: bool = False) -> None:
    """`path` holds `text`. `shared`: other processes may write the same file at the same time (each
    through a temporary file of its own); otherwise the temporary file is <name>.tmp, which a run
    folder's check knows (llm/checkpointing/run_folder.py)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp" if shared else f"{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
