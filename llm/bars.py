"""Progress for the data preparation and the tools: tqdm's live bar on a terminal; elsewhere (a
SLURM log, `make prepare > log`, a pipe), where every redraw's `\r` piles up into one unreadable
line, a plain line every LINE_SECONDS and one when the phase ends. And times as people say them."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

LINE_SECONDS = 30.0  # how often a phase that is still running says so in a file


def bar(**kwargs) -> tqdm:
    """tqdm(**kwargs) on a terminal, else plain lines (`Lines`)."""
    return tqdm(**kwargs) if sys.stderr.isatty() else Lines(**kwargs)


class Lines(tqdm):
    """tqdm that writes whole lines: one every LINE_SECONDS while the count moves and one at the end,
    none for nothing done yet; no bar of block characters, no `\r`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("mininterval", LINE_SECONDS)
        self._written_n = 0  # the count the last line showed
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> None:
        if msg is not None or self.n == self._written_n:  # a clearing, or no news (a postfix, the start)
            return
        self._written_n = self.n
        counts = "{percentage:3.0f}% {n_fmt}/{total_fmt}" if self.total else "{n_fmt}"
        left = "<{remaining}" if self.total and self.n < self.total else ""  # tqdm's estimate of the time left
        meter = {
            **self.format_dict,
            "bar_format": "{desc}: " + counts + " [{elapsed}" + left + ", {rate_fmt}{postfix}]",
        }
        self.fp.write(self.format_meter(**meter) + "\n")
        self.fp.flush()

    def close(self) -> None:
        # tqdm ends a bar it leaves with a newline of its own, which after a whole line is an empty one
        leave = bool(self.leave)  # type: ignore[has-type]  # tqdm's own attribute, untyped
        self.leave = False
        if leave and not self.disable:
            self.display()
        super().close()


def duration(seconds: float) -> str:
    """3.2 s, 14 min, 2.5 h, 3.1 days: a time as people say it."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}" if seconds < 20 * size else f"{seconds / size:,.0f} {unit}"
    return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
