"""Files and directories at any location (:mod:`xray_dist.infra.locations`): looked up, listed,
read, written whole (JSON with NaN as null, CSV, Parquet), deleted and copied, and the local copies
of remote things that libraries needing a local path get. Used through :mod:`xray_dist.infra.storage`.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import posixpath
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
from pyarrow import fs as pafs

from xray_dist.errors import StorageError
from xray_dist.infra.locations import absolute, failed, filesystem, is_uri, join, local_path, name


# ---- queries -----------------------------------------------------------------------------------------

def info(path: str | Path):
    fs, inner = filesystem(path)
    try:
        return fs.get_file_info(inner)
    except Exception as e:  # noqa: BLE001
        raise failed(path, "looking it up", e) from None


def exists(path: str | Path) -> bool:
    return info(path).type != pafs.FileType.NotFound


def is_file(path: str | Path) -> bool:
    return info(path).type == pafs.FileType.File


def is_dir(path: str | Path) -> bool:
    """A directory, or (object stores) a prefix with at least one object under it."""
    if not is_uri(path):
        return Path(local_path(path)).is_dir()
    t = info(path).type
    if t == pafs.FileType.Directory:
        return True
    return t == pafs.FileType.NotFound and bool(list_files(path, limit=1))


@dataclass(frozen=True)
class FileEntry:
    rel: str  # path relative to the listed directory, POSIX separators
    size: int
    mtime_ns: int


def list_files(directory: str | Path, limit: int | None = None) -> list[FileEntry]:
    """Every regular file under ``directory`` (recursively, sorted by relative path).

    Local directories are walked with :meth:`pathlib.Path.rglob` (symlinked files are listed as
    files, as before there was a storage layer); an object store lists its prefix. A missing
    directory gives an empty list.
    """
    if not is_uri(directory):
        root = Path(local_path(directory))
        if not root.is_dir():
            return []
        out = []
        for p in sorted(root.rglob("*")):
            if p.is_file():
                st = p.stat()
                out.append(FileEntry(p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
                if limit and len(out) >= limit:
                    break
        return out
    fs, inner = filesystem(directory)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    except Exception as e:  # noqa: BLE001
        raise failed(directory, "listing", e) from None
    out = []
    for i in infos:
        if i.type == pafs.FileType.File:
            mtime = int(i.mtime_ns) if i.mtime_ns is not None else 0
            out.append(FileEntry(i.path[len(inner):].lstrip("/"), int(i.size or 0), mtime))
    out.sort(key=lambda e: e.rel)
    return out[:limit] if limit else out


def list_dirs(directory: str | Path) -> list[str]:
    """Names of the immediate subdirectories (prefixes) of ``directory``."""
    fs, inner = filesystem(directory)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False, allow_not_found=True))
    except Exception as e:  # noqa: BLE001
        raise failed(directory, "listing", e) from None
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)


# ---- reading -----------------------------------------------------------------------------------------

def read_bytes(path: str | Path) -> bytes:
    """The whole file; :class:`FileNotFoundError` when it does not exist, :class:`StorageError` on
    any other failure."""
    if not is_uri(path):
        return Path(local_path(path)).read_bytes()
    fs, inner = filesystem(path)
    try:
        # a random-access file knows its size and fetches it in one ranged GET; an input stream's
        # read() pulls small chunks (measured: 66 objects of 8 MB from a local S3 server in 0.8 s
        # this way, 7.9 s as a stream)
        with fs.open_input_file(inner) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        if "NoSuchKey" in str(e) or "not found" in str(e).lower() or "Path does not exist" in str(e):
            raise FileNotFoundError(str(path)) from None
        raise failed(path, "reading", e) from None


_SHA256: dict[tuple, str] = {}


def content_sha256(path: str | Path) -> str:
    """SHA-256 of the file's bytes (remembered per process for the same path, size and mtime)."""
    i = info(path)
    if i.type == pafs.FileType.NotFound:
        raise FileNotFoundError(str(path))
    key = (absolute(path), i.size, i.mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = hashlib.sha256(read_bytes(path)).hexdigest()
    return _SHA256[key]


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str | Path):
    return json.loads(read_text(path))


def open_input(path: str | Path):
    """A seekable binary file object (for Parquet, NumPy and pydicom readers)."""
    return io.BytesIO(read_bytes(path))


# ---- writing -----------------------------------------------------------------------------------------

def makedirs(path: str | Path) -> None:
    """Create a local directory (and parents); nothing to do on an object store."""
    if not is_uri(path):
        Path(local_path(path)).mkdir(parents=True, exist_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (temporary name + rename locally; one upload remotely)."""
    if not is_uri(path):
        p = Path(local_path(path))
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".writing_{os.getpid()}_{threading.get_ident()}_{p.name}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, p)
        finally:
            tmp.unlink(missing_ok=True)
        return
    fs, inner = filesystem(path)
    try:
        with fs.open_output_stream(inner) as f:
            f.write(data)
    except Exception as e:  # noqa: BLE001
        raise failed(path, "writing", e) from None


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def json_safe(obj):
    """``obj`` with every non-finite float (NaN, ±inf) as None and NumPy scalars and arrays as
    Python values: standard JSON has no NaN (``json.dumps`` writes a bare ``NaN`` token that
    strict readers — browsers, jq — refuse, and its ``default`` hook is never called for floats)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # NumPy scalar or array
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps_json(obj, **kwargs) -> str:
    """Standard JSON text of ``obj`` (:func:`json_safe`: NaN and infinities become null)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def write_json(path: str | Path, obj, **kwargs) -> None:
    """``obj`` as standard JSON (:func:`dumps_json`), written whole or not at all."""
    write_text(path, dumps_json(obj, **kwargs))


def csv_text(rows: list[dict], fields: list[str]) -> str:
    """CSV text with a header of ``fields`` and one line per row (missing keys empty)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def write_csv(path: str | Path, rows: list[dict], fields: list[str]) -> None:
    """:func:`csv_text` written whole or not at all (local path or URI)."""
    write_text(path, csv_text(rows, fields))


def write_parquet(table, path: str | Path) -> None:
    """A Parquet file written whole or not at all."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(path, buf.getvalue())


def delete_file(path: str | Path) -> None:
    """Remove one file or object; nothing when it is absent."""
    fs, inner = filesystem(path)
    try:
        fs.delete_file(inner)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise failed(path, "deleting", e) from None


def delete_dir(path: str | Path) -> None:
    """Remove a directory (prefix) and everything under it; nothing when it is absent."""
    if not is_uri(path):
        shutil.rmtree(local_path(path), ignore_errors=True)
        return
    fs, inner = filesystem(path)
    for entry in list_files(path):  # object stores: delete the objects, whatever the directory markers say
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(f"{inner}/{entry.rel}")
    with contextlib.suppress(Exception):
        fs.delete_dir(inner)


def upload_file(local: str | Path, dest: str | Path) -> None:
    write_bytes(dest, Path(local).read_bytes())


def put_dir(local: str | Path, dest: str | Path, marker: str | None = None, replace: bool = False) -> None:
    """Copy the local directory ``local`` to ``dest`` (local or URI).

    ``marker``: the file (relative path) written last, so a reader that trusts only directories
    holding it never sees a partial copy. ``replace``: remove ``dest`` first.
    """
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    if not is_uri(dest):
        d = Path(local_path(dest))
        tmp = d.with_name(f".writing_{os.getpid()}_{d.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        if replace or not d.exists():
            shutil.copytree(local, tmp)
            if d.exists():
                shutil.rmtree(d)
            os.replace(tmp, d)
        else:  # merge into an existing directory, file by file
            for p in files:
                write_bytes(d / p.relative_to(local), p.read_bytes())
        return
    if replace:
        delete_dir(dest)
    last = [p for p in files if marker and p.relative_to(local).as_posix() == marker]
    for p in [p for p in files if p not in last] + last:
        write_bytes(join(dest, p.relative_to(local).as_posix()), p.read_bytes())


def get_dir(src: str | Path, local: str | Path) -> Path:
    """Copy the directory (prefix) ``src`` into the local directory ``local``; returns it."""
    local = Path(local)
    local.mkdir(parents=True, exist_ok=True)
    for entry in list_files(src):
        target = local / entry.rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(join(src, entry.rel)))
    return local


# ---- local views of remote things --------------------------------------------------------------------

_SCRATCH: Path | None = None


def scratch_dir(prefix: str = "xray_dist_") -> Path:
    """A fresh directory inside this process's own temporary directory (removed at exit).

    Workers and drivers stage remote files here, never in a path another node would have to see.
    """
    global _SCRATCH
    if _SCRATCH is None or not _SCRATCH.exists():
        _SCRATCH = Path(tempfile.mkdtemp(prefix=f"xray_dist_{os.getpid()}_"))
        atexit.register(shutil.rmtree, _SCRATCH, True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_SCRATCH))


_LOCAL_FILES: dict[tuple, Path] = {}


def local_file(path: str | Path) -> Path:
    """A local path holding the file ``path``: itself when local, else a copy downloaded once per
    process (and again when the object's size or modification time changes)."""
    if not is_uri(path):
        return Path(local_path(path))
    i = info(path)
    key = (str(path), i.size, i.mtime_ns)
    if key not in _LOCAL_FILES or not _LOCAL_FILES[key].is_file():
        try:
            data = read_bytes(path)
        except FileNotFoundError:
            raise StorageError(f"{path}: no such object") from None
        dest = scratch_dir("file_") / name(path)
        dest.write_bytes(data)
        _LOCAL_FILES[key] = dest
    return _LOCAL_FILES[key]


@contextlib.contextmanager
def local_copy(path: str | Path) -> Iterator[Path]:
    """A local directory with the contents of ``path``: the directory itself when local, else a
    temporary copy (removed afterwards)."""
    if not is_uri(path):
        yield Path(local_path(path))
        return
    tmp = scratch_dir("copy_")
    try:
        yield get_dir(path, tmp / name(path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
