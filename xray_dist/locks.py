"""One writer at a time: an exclusive lock on what a command writes (a cache, a run, a sweep, a
frozen-feature directory), locally or on object storage.

The lock is a small JSON file, ``TARGET/.xray_dist.lock``, naming its holder (host, pid, command,
since when) and refreshed by a heartbeat thread every :data:`HEARTBEAT_S` seconds. A second
command on the same target fails at once with :class:`~xray_dist.errors.LockedError`, naming the
holder. A lock is taken over, with a warning, when its holder is gone: a process of this host that
no longer exists, or a heartbeat older than :data:`STALE_S` (a holder on another machine that died).

Creating the file is atomic locally (``O_CREAT | O_EXCL``). Object stores offer no such create
through pyarrow, so there the lock is written, read back after a settling pause, and kept only if
it still names this holder — two writers racing inside that pause is the window this leaves.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from xray_dist import storage
from xray_dist.errors import LockedError

log = logging.getLogger(__name__)

LOCK = ".xray_dist.lock"
HEARTBEAT_S = 10.0
STALE_S = 60.0
_SETTLE_S = 1.0


def _holder(what: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "command": what, "token": secrets.token_hex(8),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "heartbeat": time.time()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(h: dict) -> str | None:
    """Why the holder ``h`` no longer holds its lock (None: it still does)."""
    if h.get("host") == socket.gethostname() and not _alive(int(h.get("pid", 0))):
        return f"its process {h.get('pid')} on {h.get('host')} is gone"
    age = time.time() - float(h.get("heartbeat", 0))
    if age > STALE_S:
        return f"its heartbeat stopped {age:.0f} s ago"
    return None


def _describe(h: dict) -> str:
    return f"{h.get('command', '?')} (pid {h.get('pid')} on {h.get('host')}, since {h.get('since')})"


class TargetLock:
    """``with TargetLock(target, "train"):`` — hold the lock on ``target`` for the block."""

    def __init__(self, target: str, what: str):
        self.target, self.what = storage.absolute(target), what
        self.path = storage.join(self.target, LOCK)
        self.me = _holder(what)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the file ------------------------------------------------------------------------------------
    def _read(self) -> dict | None:
        try:
            return json.loads(storage.read_text(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # cut off while written: a crashed holder's
            return {"heartbeat": 0}

    def _create_local(self) -> bool:
        p = Path(self.path)
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
        return True

    def _take(self) -> bool:
        if not storage.is_uri(self.path):
            return self._create_local()
        if self._read() is not None:
            return False
        storage.write_json(self.path, self.me)
        time.sleep(_SETTLE_S)
        now = self._read()
        return bool(now and now.get("token") == self.me["token"])

    # -- acquire / release ---------------------------------------------------------------------------
    def acquire(self) -> "TargetLock":
        for _ in range(3):
            if self._take():
                self._start_heartbeat()
                return self
            held = self._read()
            if held is None:
                continue  # released between the two looks
            why = _stale(held)
            if why is None:
                raise LockedError(f"{self.target} is being written by {_describe(held)}; wait for it to finish, or "
                                  f"use another target (its lock: {self.path})")
            log.warning("%s: taking over the lock of %s: %s", self.target, _describe(held), why)
            storage.delete_file(self.path)
        raise LockedError(f"{self.target}: could not take its lock ({self.path}); another command keeps taking it")

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                self.me["heartbeat"] = time.time()
                try:
                    storage.write_json(self.path, self.me)
                except Exception as e:  # noqa: BLE001 - a missed beat is retried; the run goes on
                    log.warning("%s: lock heartbeat failed: %s", self.target, e)

        self._thread = threading.Thread(target=beat, name="xray-dist-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self._read()
        if held is not None and held.get("token") == self.me["token"]:
            storage.delete_file(self.path)

    def __enter__(self) -> "TargetLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

