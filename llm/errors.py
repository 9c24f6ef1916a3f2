"""Bad input is answered with one line, never a traceback.

ConfigError's message names the field, the value and the fix, e.g.
`data.text=notes.txt: no such file or folder; give a .txt, .jsonl or .parquet file, a folder or a glob`.
The entry point prints it as `error: <message>` on stderr and exits with status 2; the argument
parsers answer their own errors the same way.
"""

from __future__ import annotations

import re
import sys


class ConfigError(ValueError):
    """A bad input, found before any expensive work."""


class RunStopped(Exception):
    """Training stopped before its end, with what happened and what to do next: a stop signal (after
    a checkpoint), too many non-finite steps in a row, a checkpoint that could not be written. The
    entry point prints `stopped: <message>` on stderr and exits with `status`. `requeue`: the SLURM
    job to put back in the queue once this process has finished its cleanup (W&B's files complete),
    as its last act: SLURM ends the job's processes as soon as it is requeued; `otherwise`, what to
    do if that fails."""

    def __init__(self, message: str, status: int = 1, requeue: str | None = None, otherwise: str = ""):
        super().__init__(message)
        self.status = status
        self.requeue = requeue
        self.otherwise = otherwise


def one_line(message: str) -> str:
    """An argument parser's message, on one line; a missing config file gets its own wording."""
    text = re.sub(r"\s+", " ", str(message)).strip()
    missing = re.search(r'Parser key "([\w.]+)": Unable to load config [\'"]([^\'"]+)[\'"]', text)
    if missing:  # e.g. MODEL=nope becomes --model.config=configs/model/nope.yaml
        key, path = missing.groups()
        folder = path.rsplit("/", 1)[0] if "/" in path else "."
        return f"{key}={path}: no such config file; see {folder}/ for the ones there are"
    return text if len(text) < 400 else text[:397] + "..."


class OneLineErrors:
    """Mixin for jsonargparse parsers: `error: <message>` on stderr, exit status 2, no usage dump."""

    def error(self, message: str, ex: Exception | None = None):
        if not getattr(self, "exit_on_error", True):
            return super().error(message, ex)
        sys.stderr.write(f"error: {one_line(message)}\n")
        sys.exit(2)


def exception_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's message on one line, cut at `limit` characters: the reason inside a one-line answer."""
    text = " ".join(str(exc).split())
    return text[:limit] + ("..." if len(text) > limit else "")
