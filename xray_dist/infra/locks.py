"""One writer at a time: an exclusive lock on what a command writes (a cache, a run, a sweep, a
frozen-feature directory), locally or on object storage.

The lock is a small JSON object, ``TARGET/.xray_dist.lock``, naming its holder (host, pid, command,
a random token, since when, last heartbeat). A second command on the same target fails at once
with :class:`~xray_dist.errors.LockedError`, naming the holder. A lock is taken over, with a
warning, when its holder is gone: a process of this host that no longer exists, or a heartbeat
older than :data:`STALE_S` (a holder elsewhere that died or hangs). A lock that is empty or cannot be
parsed counts as held by an unknown holder until the file itself is :data:`STALE_S` old.

Every change of the lock is one atomic step that only one racer can win, and the holder never
writes over a lock that is no longer its own:

- **Local paths.** *Create*: the record is written whole under a private name and ``os.link``-ed
  to the lock name, which fails if a lock exists (success is judged by the file's link count, as
  NFS may answer a retried link that worked with "exists"; a filesystem without hard links gets
  ``O_CREAT | O_EXCL`` and then the write; the empty file a reader may see meanwhile counts as
  held). *Take over*: the lock judged stale is renamed to a private name — only one racer's rename
  finds it — and kept only if the renamed file is the very one judged (same inode, still stale);
  then the taker creates its own as above. A racer that moved a newer lock by mistake links it
  back at once. *Heartbeat*: when the lock name still points at the holder's own file (same
  inode), the record is rewritten in place through the holder's open descriptor, padded to a fixed
  length, so it can never land on another holder's file. *Release*: rename away, check it is the
  own file, delete (or link back what is not).
- **s3:// URIs.** Conditional writes through boto3 (:mod:`xray_dist.infra.s3lock`): *create* is
  ``PutObject(IfNoneMatch="*")``, *take over* and *heartbeat* are ``PutObject(IfMatch=<the ETag
  last seen>)``, *release* is ``DeleteObject(IfMatch=<own ETag>)``; a refused one means another
  writer won. Since the SDK retries a PUT whose answer was lost, a refused PUT is followed by a
  read that checks whether the object is this holder's own after all (its token).
- **Other object stores** (``gs://``, ``abfs://``) offer no conditional write through pyarrow: the
  lock there is written, read back after a pause and kept if it still names its writer, which
  leaves a window for two writers racing inside the pause (a warning says so).

The heartbeat thread beats every :data:`HEARTBEAT_S` seconds. When the lock is no longer its own
(taken over while this process was paused or cut off, or deleted), or when its beats have failed
for longer than :data:`STALE_S`, it stops the whole command: it prints one line, ``xray-dist:
error: COMMAND lost the lock on TARGET (why)``, and ends the process with ``os._exit(2)``. Not an
exception raised in the main thread: the main thread spends its time in calls that no Python
exception reaches in time (a Ray ``get`` or Train ``fit`` waiting in C++, a pyarrow upload,
TensorFlow), and an exception can be caught by any ``except Exception`` on its way up; a process
that no longer holds its target must stop writing now, not when it next runs Python code. Its Ray
workers end with it (Ray stops a job's workers when its driver exits).

:data:`HEARTBEAT_S` and :data:`STALE_S` come from ``XRAY_DIST_LOCK_HEARTBEAT_S`` /
``XRAY_DIST_LOCK_STALE_S`` when set (tests; very slow stores). Every command writing one target
must use the same values, and clocks of hosts sharing a target must agree to within a few seconds.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from xray_dist.errors import LockedError, XrayDistError
from xray_dist.infra import storage
from xray_dist.infra.s3lock import S3Object, is_s3, lost_race

log = logging.getLogger(__name__)

LOCK = ".xray_dist.lock"


def _seconds(var: str, default: float) -> float:
    value = os.environ.get(var)
    if value is None:
        return default
    try:
        s = float(value)
    except ValueError:
        s = -1.0
    if not s > 0:
        raise XrayDistError(f"{var}={value!r}: expected a number of seconds above 0")
    return s


#: Seconds between two heartbeats of a holder.
HEARTBEAT_S = _seconds("XRAY_DIST_LOCK_HEARTBEAT_S", 10.0)
#: Seconds without a heartbeat after which a lock is taken over (and its holder, if it comes back, stops).
STALE_S = _seconds("XRAY_DIST_LOCK_STALE_S", 60.0)
#: Pause before a lost lock is declared lost (a racer that moved it by mistake links it back at once).
_CONFIRM_S = 0.2
#: Settling pause of the read-back protocol on object stores without conditional writes.
_SETTLE_S = 1.0
#: Spare room in a local lock record, so that a heartbeat rewrites it in place at a fixed length.
_PAD = 48


def _holder(what: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "command": what, "token": secrets.token_hex(8),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "heartbeat": round(time.time(), 3)}


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class _Seen:
    """One look at the lock: its holder (None when empty or unparsable), what identifies this very
    version of it (``(st_dev, st_ino)`` locally, the ETag on S3) and the age of the file itself."""

    holder: dict | None
    ident: object
    age_s: float


def _parse(data: bytes) -> dict | None:
    try:
        h = json.loads(data.decode("utf-8"))
        if isinstance(h, dict):
            float(h.get("heartbeat", 0))
            return h
    except (ValueError, TypeError):
        pass
    return None


def _stale(seen: _Seen) -> str | None:
    """Why the lock seen no longer has a holder (None: it still has one)."""
    h = seen.holder
    if h is None:
        if seen.age_s > STALE_S:
            return f"it is empty or unreadable and {seen.age_s:.0f} s old"
        return None
    try:
        pid = int(h.get("pid", 0))
    except (TypeError, ValueError):
        pid = 0
    if h.get("host") == socket.gethostname() and not _alive(pid):
        return f"its process {h.get('pid')} on {h.get('host')} is gone"
    age = time.time() - float(h.get("heartbeat", 0))
    if age > STALE_S:
        return f"its heartbeat stopped {age:.0f} s ago"
    return None


def _describe(h: dict | None) -> str:
    if h is None:
        return "an unknown holder (its lock is empty or unreadable: being written, or left by a crash)"
    return f"{h.get('command', '?')} (pid {h.get('pid')} on {h.get('host')}, since {h.get('since')})"


class TargetLock:
    """``with TargetLock(target, "train"):`` — hold the lock on ``target`` for the block."""

    def __init__(self, target: str, what: str):
        self.target, self.what = storage.absolute(target), what
        self.path = storage.join(self.target, LOCK)
        self.me = _holder(what)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()  # one change of the lock at a time (heartbeat vs release)
        self._fd: int | None = None  # local: the own lock file, open
        self._size = 0  # local: the fixed length of the own record
        self._etag: str | None = None  # s3: the ETag of the own lock object
        self._kind = "s3" if storage.is_uri(self.path) and is_s3(self.path) else \
            "uri" if storage.is_uri(self.path) else "local"
        self._object = S3Object(self.path) if self._kind == "s3" else None

    # -- local ---------------------------------------------------------------------------------------
    def _record(self) -> bytes:
        data = json.dumps(self.me).encode()
        self._size = max(self._size, len(data) + _PAD)
        return data.ljust(self._size)

    @staticmethod
    def _look_local(path: str) -> _Seen | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            data = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
        return _Seen(_parse(data), (st.st_dev, st.st_ino), time.time() - st.st_mtime)

    def _create_local(self) -> bool:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        record = self._record()
        tmp = f"{self.path}.{self.me['token']}.new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, record)
            try:
                os.link(tmp, self.path)  # creates the lock name for a complete file, or fails
            except FileExistsError:
                if os.fstat(fd).st_nlink != 2:  # (NFS may answer a retried link that had worked with EEXIST)
                    os.close(fd)
                    return False
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK):
                    raise
                os.close(fd)  # no hard links here: an exclusive create, then the write
                fd = -1
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                os.write(fd, record)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        self._fd = fd
        return True

    def _move_aside(self, expected, still_stale: bool) -> bool:
        """Rename the lock to a private name; keep it moved (True) only when it is the file
        ``expected`` (and, with ``still_stale``, still stale); otherwise link it back."""
        aside = f"{self.path}.{self.me['token']}.old"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = self._look_local(aside)
            if moved is not None and moved.ident == expected and (not still_stale or _stale(moved)):
                return True
            try:  # a newer lock than the one judged: put it back
                os.link(aside, self.path)
            except FileExistsError:
                log.warning("%s: a lock moved aside by mistake could not be put back; its holder will stop",
                            self.target)
            return False
        finally:
            try:
                os.unlink(aside)
            except FileNotFoundError:
                pass

    def _own_local(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        own = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    # -- s3 ------------------------------------------------------------------------------------------
    def _look_s3(self) -> _Seen | None:
        got = self._object.get()
        if got is None:
            return None
        data, etag, modified = got
        age = time.time() - modified - 1.0  # whole seconds there: never count it older
        return _Seen(_parse(data), etag, max(0.0, age))

    def _put_s3(self, **condition) -> bool:
        """A conditional PUT of the own record: True if it is in place (the own ETag kept)."""
        try:
            self._etag = self._object.put(json.dumps(self.me).encode(), **condition)
        except Exception as e:  # noqa: BLE001 - only a lost race gets here
            if not lost_race(e):
                raise
            now = self._look_s3()  # a retried PUT whose first try landed is refused, yet the lock is ours
            if now is None or now.holder is None or now.holder.get("token") != self.me["token"]:
                return False
            self._etag = now.ident
        return True

    # -- object stores without conditional writes ----------------------------------------------------
    def _look_uri(self) -> _Seen | None:
        try:
            data = storage.read_bytes(self.path)
        except FileNotFoundError:
            return None
        h = _parse(data)  # a PUT is whole: an unparsable object is damaged, not being written
        return _Seen(h, h.get("token") if h else None, float("inf") if h is None else 0.0)

    def _write_and_check_uri(self) -> bool:
        log.warning("%s: %s offers no conditional write here; two commands starting within %.0f s of each other "
                    "could both take this lock", self.target, self.path.split("://", 1)[0], _SETTLE_S)
        storage.write_json(self.path, self.me)
        time.sleep(_SETTLE_S)
        now = self._look_uri()
        return bool(now and now.holder and now.holder.get("token") == self.me["token"])

    # -- the steps, per kind -------------------------------------------------------------------------
    def _look(self) -> _Seen | None:
        if self._kind == "local":
            return self._look_local(self.path)
        return self._look_s3() if self._kind == "s3" else self._look_uri()

    def _create(self) -> bool:
        if self._kind == "local":
            return self._create_local()
        if self._kind == "s3":
            return self._put_s3(IfNoneMatch="*")
        return self._look_uri() is None and self._write_and_check_uri()

    def _take_over(self, seen: _Seen) -> bool:
        if self._kind == "local":
            return self._move_aside(seen.ident, still_stale=True) and self._create_local()
        if self._kind == "s3":
            return self._put_s3(IfMatch=seen.ident)
        storage.delete_file(self.path)
        return self._create()

    def _beat(self) -> str | None:
        """One heartbeat: None when the lock is still this holder's (and refreshed), else why not."""
        with self._mutex:
            if self._stop.is_set():
                return None
            self.me["heartbeat"] = round(time.time(), 3)
            if self._kind == "local":
                if self._own_local():
                    os.pwrite(self._fd, self._record(), 0)  # the own file, whatever the name points at now
                    return None
            elif self._kind == "s3":
                if self._put_s3(IfMatch=self._etag):
                    return None
            else:
                now = self._look_uri()
                if now and now.holder and now.holder.get("token") == self.me["token"]:
                    storage.write_json(self.path, self.me)
                    return None
        now = self._look()
        if now is None:
            return f"its lock file {self.path} was deleted"
        return f"its lock was taken over by {_describe(now.holder)}"

    # -- acquire / release ---------------------------------------------------------------------------
    def acquire(self) -> "TargetLock":
        if not 0 < HEARTBEAT_S < STALE_S:
            raise XrayDistError(f"lock timing: the heartbeat ({HEARTBEAT_S} s) must be shorter than the stale "
                                f"limit ({STALE_S} s) (XRAY_DIST_LOCK_HEARTBEAT_S, XRAY_DIST_LOCK_STALE_S)")
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return self
            seen = self._look()
            if seen is None:
                continue  # released between the two looks
            why = _stale(seen)
            if why is None:
                raise LockedError(f"{self.target} is being written by {_describe(seen.holder)}; wait for it to finish, "
                                  f"or use another target (its lock: {self.path})")
            log.warning("%s: taking over the lock of %s: %s", self.target, _describe(seen.holder), why)
            if self._take_over(seen):
                self._start_heartbeat()
                return self
            # another command took it over first: the next look names it
        raise LockedError(f"{self.target}: could not take its lock ({self.path}); another command keeps taking it")

    def _start_heartbeat(self) -> None:
        def beat():
            last_ok = time.monotonic()
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    why = self._beat()
                    if why is not None:  # confirm: a racer that moved the lock by mistake puts it back at once
                        time.sleep(_CONFIRM_S)
                        why = self._beat()
                except Exception as e:  # noqa: BLE001 - a missed beat is retried until the stale limit
                    failing = time.monotonic() - last_ok
                    if failing <= STALE_S:
                        log.warning("%s: lock heartbeat failed: %s", self.target, e)
                        continue
                    why = f"its heartbeat has failed for {failing:.0f} s ({' '.join(str(e).split())[:200]})"
                if why is None:
                    last_ok = time.monotonic()
                    continue
                if not self._stop.is_set():
                    self._lost(why)
                return

        self._thread = threading.Thread(target=beat, name="xray-dist-lock-heartbeat", daemon=True)
        self._thread.start()

    def _lost(self, why: str) -> None:
        """Stop this process at once: another command owns the target now (see the module docstring)."""
        line = f"xray-dist: error: {self.what} lost the lock on {self.target} ({why}); stopped so as not to " \
               f"write over its new holder"
        log.debug("%s", line)
        for h in logging.getLogger().handlers:
            try:
                h.flush()
            except Exception:  # noqa: BLE001 - the line below matters more
                pass
        try:
            print(line, file=sys.stderr, flush=True)
        finally:
            os._exit(2)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._mutex:
            if self._kind == "local":
                if self._fd is not None:
                    own = os.fstat(self._fd)
                    if self._own_local():
                        self._move_aside((own.st_dev, own.st_ino), still_stale=False)
                    os.close(self._fd)
                    self._fd = None
            elif self._kind == "s3":
                if self._etag is not None:
                    self._object.delete(self._etag)
                    self._etag = None
            else:
                held = self._look_uri()
                if held and held.holder and held.holder.get("token") == self.me["token"]:
                    storage.delete_file(self.path)

    def __enter__(self) -> "TargetLock":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.release()
            return
        try:  # the command's own error is the one to report; a failed release only logged
            self.release()
        except Exception as e:  # noqa: BLE001
            log.warning("releasing the lock on %s failed: %s", self.target, e)
