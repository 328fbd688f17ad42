"""An exclusive lock on a run directory, held by rank 0 for the life of a run.

`<run_dir>/run.lock` is locked with `fcntl.flock` and holds a JSON line naming the holder
(host, pid, start time). The kernel drops the lock when its process dies, however it dies
(SIGKILL included), so a lock that can be taken while the file still names a holder was left by
a process that is gone: it is taken over, with a line saying so.

Guarantees: on one host, two processes never hold it at once. Across hosts it is as good as the
filesystem's flock: NFSv4 and Lustre (mounted with `-o flock`) lock across clients; NFS mounted
with `nolock`, Lustre with `localflock` and some FUSE filesystems lock per host only. There, two
trainers on different hosts are not kept apart (the takeover line then names a live holder on
another host -- the sign to look at).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from harness.errors import HarnessError

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class RunLock:
    """`acquire()` -> self (HarnessError naming the holder if held), `release()`; a context manager."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise HarnessError(f"run dir {self.run_dir} is in use by {holder} (lock {self.path}); "
                               "wait for it to finish, stop it, or use another --run-dir") from None
        except OSError as exc:
            os.close(fd)
            raise HarnessError(f"{self.path}: cannot lock the run dir ({exc.strerror or exc})") from None
        previous = _read(fd)
        if previous:
            # Our flock succeeded, so whoever wrote this no longer holds it (killed, node lost).
            log.warning("run dir %s: took over the lock left by %s (%s)", self.run_dir,
                        _describe(previous), _liveness(previous))
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear the holder line (a clean exit leaves no takeover message) and unlock."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        info = json.loads(raw) if raw else {}
    except (OSError, ValueError):
        info = {"host": "?", "pid": "?", "started": "? (unreadable lock file)"}
    return info if isinstance(info, dict) else {}


def _describe(info: dict) -> str:
    if not info:
        return "another process (no holder recorded yet)"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (started {info.get('started', '?')})"


def _liveness(info: dict) -> str:
    if info.get("host") != socket.gethostname():
        return "on another host: cannot check that it is gone"
    try:
        os.kill(int(info["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError, TypeError):
        return "no such process any more"
    except PermissionError:
        pass
    return "a process with that pid exists but does not hold the lock (pid reused)"
