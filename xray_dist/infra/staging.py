"""Outputs that appear whole or not at all: a command writes into a local staging directory, which
is moved (renamed locally, uploaded to an object store) into place only when the command succeeds.

A subdirectory replaced on object storage, which has no rename, is uploaded beside the old one as a
version and switched to by one PUT of a pointer; :func:`current_dir` is how readers follow it.
Used through :mod:`xray_dist.infra.storage`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from xray_dist.errors import StorageError
from xray_dist.infra.files import (delete_dir, exists, list_dirs, list_files, put_dir, read_bytes, scratch_dir,
                                   upload_file, write_json)
from xray_dist.infra.locations import absolute, is_uri, join, local_path, name, parent


@contextlib.contextmanager
def staged_output(path: str | Path, replace: tuple[str, ...] = (), marker: str | None = None) -> Iterator[Path]:
    """A local directory to write ``path``'s outputs into, moved into ``path`` (renamed locally,
    uploaded to a URI) only when the block ends without an error: a crash or a full disk half-way
    leaves ``path``'s previous outputs as they were, whole.

    ``replace``: subdirectories swapped whole, so a rewritten one holds no stale file and a reader
    sees the old one or the new one, never a mix or nothing. Locally the new directory is renamed in
    (:func:`_move_into`). On object storage, where nothing renames a prefix, a subdirectory that is
    already there is uploaded beside it as a version (``sub.v<id>/``), checked complete, and then
    switched to by one PUT of its pointer ``sub.current`` (:func:`current_dir` follows it); the old
    one is removed after the switch. An upload that fails half-way leaves the old one in use (the
    partial version is removed, or by the next export). The first upload of a subdirectory goes to
    ``sub/`` itself: there is nothing to keep whole yet.

    ``marker``: the file moved or uploaded last (readers that trust it see every other file, and
    the switched subdirectories, already there)."""
    if not is_uri(path):
        p = Path(local_path(path))
        p.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".writing_{os.getpid()}_", dir=p))  # same filesystem: renames
        try:
            yield tmp
            _move_into(tmp, p, replace, marker)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    tmp = scratch_dir("out_")
    try:
        yield tmp
        uploaded: list[_Upload] = []
        try:
            for sub in replace:
                if (tmp / sub).is_dir():
                    uploaded.append(_upload_beside(tmp / sub, join(path, sub)))
                    shutil.rmtree(tmp / sub)  # uploaded: not again below
        except BaseException:
            for u in uploaded:  # a later subdirectory failed: no pointer was written, none is used
                u.discard()
            raise
        # the other files, then the switch, then the marker, and only then the old versions go: a
        # failure at any step leaves the previous model in place (and its marker the old one)
        held = None
        if marker and (tmp / marker).is_file():
            held = Path(tempfile.mkdtemp(prefix="marker_", dir=tmp.parent)) / "marker"
            os.replace(tmp / marker, held)
        try:
            put_dir(tmp, path)
            for u in uploaded:
                u.switch()
            if held is not None:
                upload_file(held, join(path, marker))
        finally:
            if held is not None:
                shutil.rmtree(held.parent, ignore_errors=True)
        for u in uploaded:
            u.drop_old()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into(src: Path, dest: Path, replace: tuple[str, ...], marker: str | None) -> None:
    """Move the finished files of ``src`` into ``dest``, each by an atomic rename (``marker`` last);
    a ``replace`` subdirectory is swapped whole (the old one renamed aside, then removed). A
    subdirectory that came from object storage with a pointer (``sub.current``, :func:`current_dir`)
    keeps it until the new one is in place, then loses it and its versions."""
    for sub in replace:
        if (src / sub).is_dir():
            old = dest / f".old_{os.getpid()}_{sub}"
            if (dest / sub).exists():
                os.replace(dest / sub, old)
            os.replace(src / sub, dest / sub)
            shutil.rmtree(old, ignore_errors=True)
            pointer = Path(_pointer(str(dest / sub)))
            if pointer.is_file():  # readers followed it to a whole old version until now
                pointer.unlink()
                _drop_versions(str(dest / sub), keep=None)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.relative_to(src).as_posix() == marker)
    for f in files:
        target = dest / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, target)


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """A local file path to write; moved (or uploaded) to ``path`` whole when the block succeeds."""
    tmp = scratch_dir("file_") / name(path)
    try:
        yield tmp
        upload_file(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


# ---- a directory replaced on object storage: versions beside it and a pointer ----------------------------
#
# Object stores have no rename, so a directory cannot be swapped in place: deleting the old one first
# leaves nothing loadable if the upload then fails. Instead the new one is uploaded beside it as
# ``D.v<id>/`` and made current by one PUT of the pointer ``D.current`` (``{"current": "D.v<id>"}``):
# a reader that asks :func:`current_dir` gets the old directory or the new one, each whole.

#: Suffix of a directory's pointer object (``model.current`` beside ``model/``).
POINTER_SUFFIX = ".current"
_VERSION_TAG = re.compile(r"\.v[0-9a-f]{8,40}")


def _pointer(path: str) -> str:
    return join(parent(path), name(path) + POINTER_SUFFIX)


def _is_version_of(path: str, candidate: str) -> bool:
    base = name(path)
    return candidate.startswith(base) and bool(_VERSION_TAG.fullmatch(candidate[len(base):]))


def current_dir(path: str | Path) -> str:
    """The directory that holds ``path``'s files now: the version its pointer ``PATH.current``
    names (a directory replaced on object storage by :func:`staged_output`), else ``path`` itself.

    Readers of a directory that :func:`staged_output` replaces (a run's ``model/``, an export's
    ``savedmodel/``) open it through this. A pointer that is not one (unreadable, or naming
    anything but a version of ``path`` beside it) is a :class:`StorageError` naming it.
    """
    path = absolute(path)
    pointer = _pointer(path)
    try:
        data = read_bytes(pointer)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return path
    try:
        version = json.loads(data.decode("utf-8"))["current"]
    except (ValueError, KeyError, TypeError):
        version = None
    if not isinstance(version, str) or not _is_version_of(path, version):
        raise StorageError(f"{pointer}: not a pointer to a version of {name(path)}/ (expected "
                           f'{{"current": "{name(path)}.v<hex>"}}); remove it or export again')
    return join(parent(path), version)


def _drop_versions(path: str, keep: str | None) -> None:
    """Remove every version of ``path`` beside it (``name.v<id>/``) but ``keep``."""
    for d in list_dirs(parent(path)):
        if d != keep and _is_version_of(path, d):
            delete_dir(join(parent(path), d))


def _same_files(local: Path, dest: str) -> str | None:
    """Why ``dest`` is not a whole copy of the local directory ``local`` (None: it is)."""
    want = {p.relative_to(local).as_posix(): p.stat().st_size for p in local.rglob("*") if p.is_file()}
    have = {e.rel: e.size for e in list_files(dest)}
    lost = sorted(set(want) - set(have))
    short = sorted(r for r in want if r in have and have[r] != want[r])
    if not lost and not short:
        return None
    return (f"{len(lost)} of {len(want)} files absent" if lost else "") + \
        (f"{', ' if lost else ''}{len(short)} of another size" if short else "")


@dataclass
class _Upload:
    """A subdirectory uploaded by :func:`staged_output`: ``dest`` as readers name it, and the
    version it was uploaded to (None: into ``dest`` itself, the first time)."""

    dest: str
    version: str | None

    def switch(self) -> None:
        if self.version is not None:  # one PUT: readers see the old directory or the new one
            write_json(_pointer(self.dest), {"current": self.version})

    def drop_old(self) -> None:
        """After :meth:`switch`: the superseded copies (the directory itself, older versions)."""
        if self.version is not None:
            delete_dir(self.dest)
        _drop_versions(self.dest, keep=self.version)

    def discard(self) -> None:
        """Before :meth:`switch`: the new version, which no pointer names (best effort)."""
        if self.version is not None:
            with contextlib.suppress(Exception):
                delete_dir(join(parent(self.dest), self.version))


def _upload_beside(local: Path, dest: str) -> _Upload:
    """Upload the local directory ``local`` for ``dest`` (a URI) without touching what is there:
    into ``dest`` itself when neither it nor a pointer to it exists, else into a new version beside
    it, checked whole. A failure removes the partial version (best effort) and raises."""
    if not exists(_pointer(dest)) and not list_files(dest, limit=1):
        put_dir(local, dest)
        return _Upload(dest, None)
    version = f"{name(dest)}.v{time.time_ns():x}{secrets.token_hex(3)}"
    target = join(parent(dest), version)
    upload = _Upload(dest, version)
    try:
        put_dir(local, target)
        why = _same_files(local, target)
        if why:
            raise StorageError(f"{target}: the upload is not whole ({why}); {name(dest)}/ stays as it was")
    except BaseException:
        upload.discard()
        raise
    return upload
