"""One preparation of a cache folder at a time, among every process that shares the folder."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path

HEARTBEAT_SECONDS = 10.0
# A holder on another host that has not touched its lock for this long is gone. Longer than NFS's
# attribute cache (60 s at most by default), through which other hosts see the lock's mtime.
STALE_SECONDS = 180.0


class PreparationLock:
    """One preparation per cache folder at a time, among all the processes that share it: on a
    shared filesystem the first node prepares and the others wait for its result; on node-local
    disks each node holds its own lock. The lock is a file created exclusively (O_EXCL, atomic on
    local disks and NFS alike) that names its holder, who touches it every HEARTBEAT_SECONDS.

    A lock left by a process that is gone is taken over: on this host when its process no longer
    runs; from another host (a job requeued onto other nodes) when its mtime has not changed for
    STALE_SECONDS of the waiter's own clock, so that clocks that differ between hosts do not matter."""

    def __init__(
        self,
        out: Path,
        log,
        poll_seconds: float = 1.0,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        stale_seconds: float = STALE_SECONDS,
    ):
        self.path = out.parent / f".lock-{out.name}"
        self.out, self.log, self.poll = out, log, poll_seconds
        self.heartbeat, self.stale = heartbeat_seconds, stale_seconds
        self.me = f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()

    def __enter__(self):
        said = False
        seen: tuple[str | None, float | None, float] | None = None  # (holder, its mtime, since when unchanged)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder, mtime = self._holder()
                if seen is None or seen[:2] != (holder, mtime):
                    seen = (holder, mtime, time.monotonic())
                quiet = time.monotonic() - seen[2]
                if holder is not None and self._is_gone(holder, quiet):
                    self._take_over(holder)
                    continue
                if (self.out / "meta.json").is_file():
                    return self  # done by the holder, which is about to release its lock
                if not said and holder:
                    self.log(
                        f"waiting for {_who(holder)} to prepare {self.out} (a lock its process "
                        f"no longer refreshes is taken over after {self.stale:.0f} s)"
                    )
                    said = True
                time.sleep(self.poll)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.me)
            self.held = True
            threading.Thread(target=self._beat, name="preparation-lock", daemon=True).start()
            return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if getattr(self, "held", False) and self._holder()[0] == self.me:
            self.path.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def _holder(self) -> tuple[str | None, float | None]:
        try:
            return self.path.read_text().strip() or None, self.path.stat().st_mtime
        except FileNotFoundError:
            return None, None

    def _is_gone(self, holder: str, quiet: float) -> bool:
        host, _, rest = holder.partition(" ")
        pid = rest.split(" ")[0]
        if host == socket.gethostname() and pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
            return False
        return quiet >= self.stale

    def _take_over(self, holder: str) -> None:
        """Remove the lock of a holder that is gone, and not one a third process has just taken over:
        the lock is moved aside first and put back if it turns out to be another's."""
        aside = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_text().strip() != holder:
            try:
                os.link(aside, self.path)  # fails if yet another process holds the lock by now
            except FileExistsError:
                pass
        else:
            self.log(f"taking over the preparation of {self.out} from {_who(holder)}, which is gone")
        aside.unlink(missing_ok=True)


def _who(holder: str) -> str:
    """ "host pid" of a lock's holder."""
    return " ".join(holder.split(" ")[:2])
