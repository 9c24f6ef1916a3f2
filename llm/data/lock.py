"""One preparation of a cache folder at a time, among every process that shares the folder."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path


class PreparationLock:
    """One preparation per cache folder at a time, among all the processes that share it: on a
    shared filesystem the first node prepares and the others wait for its result; on node-local
    disks each node holds its own lock. The lock is a file created exclusively (O_EXCL, atomic on
    local disks and NFS alike) that names its holder; a holder on this host that no longer runs
    leaves a stale lock, which is taken over."""

    def __init__(self, out: Path, log, poll_seconds: float = 1.0):
        self.path = out.parent / f".lock-{out.name}"
        self.out, self.log, self.poll = out, log, poll_seconds
        self.me = f"{socket.gethostname()} {os.getpid()}"

    def __enter__(self):
        said = False
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._is_stale(holder):
                    self.path.unlink(missing_ok=True)
                    continue
                if (self.out / "meta.json").is_file():
                    return self  # done by the holder, which is about to release its lock
                if not said and holder:
                    self.log(
                        f"waiting for {holder} to prepare {self.out} (if that process is gone, remove {self.path})"
                    )
                    said = True
                time.sleep(self.poll)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.me)
            self.held = True
            return self

    def __exit__(self, *exc) -> None:
        if getattr(self, "held", False):
            self.path.unlink(missing_ok=True)

    def _holder(self) -> str | None:
        try:
            return self.path.read_text().strip() or None
        except FileNotFoundError:
            return None

    @staticmethod
    def _is_stale(holder: str) -> bool:
        host, _, pid = holder.partition(" ")
        if host != socket.gethostname() or not pid.isdigit():
            return False  # another host's process: only that host knows whether it still runs
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
