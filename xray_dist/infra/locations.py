"""What a user's path names, and the filesystem that opens it.

Every path a user gives is either a local path or a URI (``s3://bucket/prefix``, ``gs://…``,
``abfs://…``). This module tells them apart, joins and splits them, checks what may be inside
what, and opens each with the ``pyarrow.fs`` filesystem its scheme names — the layer Ray Train and
Ray Data use themselves — or refuses it with :class:`~xray_dist.errors.StorageError`. S3 is
configured from the environment, with short timeouts and few retries (see :mod:`xray_dist.infra.storage`).
"""

from __future__ import annotations

import os
import posixpath
import re
import threading
from pathlib import Path

from pyarrow import fs as pafs

from xray_dist.errors import StorageError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")
#: Seconds before an S3 connection attempt or request is given up (then retried ``S3_ATTEMPTS`` times);
#: the lock's boto3 client (:mod:`xray_dist.infra.s3lock`) uses the same.
S3_CONNECT_TIMEOUT = 5.0
S3_REQUEST_TIMEOUT = 30.0
S3_ATTEMPTS = 3
#: Environment variables that configure object storage and hold no secret; forwarded to Ray workers.
PUBLIC_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def is_uri(path: str | Path) -> bool:
    """Whether ``path`` names an object store (``scheme://…``); ``file://`` counts as local."""
    m = _SCHEME.match(str(path))
    return bool(m) and m.group(1).lower() != "file"


def local_path(path: str | Path) -> str:
    """A local path (``file://`` stripped) made absolute, links resolved."""
    s = str(path)
    if s.startswith("file://"):
        s = s[len("file://"):]
    return str(Path(s).expanduser().resolve())


def absolute(path: str | Path) -> str:
    """A URI unchanged (trailing ``/`` dropped); a local path made absolute against the working directory."""
    return str(path).rstrip("/") if is_uri(path) else local_path(path)


def join(base: str | Path, *parts: str) -> str:
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts if p)])
    return str(Path(base, *parts))


def name(path: str | Path) -> str:
    """The last component (``Path.name`` for URIs too)."""
    return posixpath.basename(str(path).rstrip("/")) if is_uri(path) else Path(path).name


def parent(path: str | Path) -> str:
    if is_uri(path):
        return posixpath.dirname(str(path).rstrip("/"))
    return str(Path(path).parent)


# ---- filesystems -------------------------------------------------------------------------------------

_FS_CACHE: dict[tuple, object] = {}
_FS_LOCK = threading.Lock()


def _s3_filesystem():
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    key = ("s3", endpoint, region)
    with _FS_LOCK:
        if key not in _FS_CACHE:
            kwargs = {"connect_timeout": S3_CONNECT_TIMEOUT, "request_timeout": S3_REQUEST_TIMEOUT,
                      "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS)}
            if endpoint:
                kwargs["endpoint_override"] = endpoint
            if region:
                kwargs["region"] = region
            _FS_CACHE[key] = pafs.S3FileSystem(**kwargs)
        return _FS_CACHE[key]


def filesystem(path: str | Path):
    """``(pyarrow FileSystem, path inside it)`` for a local path or a URI.

    ``s3://`` gets an :class:`pyarrow.fs.S3FileSystem` configured from the environment (endpoint,
    region, short timeouts); other schemes go to :func:`pyarrow.fs.FileSystem.from_uri`. A scheme
    pyarrow cannot open is a :class:`StorageError`.
    """
    if not is_uri(path):
        return pafs.LocalFileSystem(), local_path(path)
    s = str(path).rstrip("/")
    scheme, rest = _SCHEME.match(s).groups()
    if scheme.lower() in ("s3", "s3a"):
        if not rest or rest.startswith("/"):
            raise StorageError(f"{s}: no bucket in the URI (expected s3://BUCKET/prefix)")
        return _s3_filesystem(), rest
    try:
        return pafs.FileSystem.from_uri(s)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ArrowNotImplementedError
        raise StorageError(f"{s}: cannot open this URI ({short(e)}); xray-dist takes local paths and the object "
                           "stores pyarrow supports (s3://, gs://, abfs://)") from None


def ray_storage(path: str | Path) -> tuple[str, object | None]:
    """``(storage_path, storage_filesystem)`` for Ray Train / Tune's ``RunConfig``."""
    if not is_uri(path):
        return absolute(path), None
    fs, inner = filesystem(path)
    return inner, fs


def short(e: BaseException) -> str:
    """An exception's message on one line, at most 300 characters."""
    text = " ".join(str(e).split())
    return text[:300]


def failed(path: str | Path, what: str, e: BaseException) -> StorageError:
    """The :class:`StorageError` of ``what`` (reading, listing ...) failing on ``path``."""
    return StorageError(f"{path}: {what} failed: {short(e)}")


def check_location(path: str | Path) -> None:
    """Fail fast on a URI that cannot work: unknown scheme, unreachable endpoint, missing bucket.

    Local paths always pass (their parent directories are created when written to).
    """
    if not is_uri(path):
        return
    fs, inner = filesystem(path)
    bucket = inner.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"{path}: cannot reach the object store ({short(e)}); check AWS_ENDPOINT_URL, the network "
                           "and the credentials") from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{path}: bucket {bucket!r} does not exist (create it first)")


def contains(outer: str | Path, inner: str | Path) -> bool:
    """Whether ``inner`` is ``outer`` or lies under it: local paths compared after resolving
    symlinks, URIs by scheme, bucket and key prefix (``s3://b/x`` contains ``s3://b/x/y``, not
    ``s3://b/xy``)."""
    if is_uri(outer) != is_uri(inner):
        return False
    if not is_uri(outer):
        return Path(local_path(inner)).is_relative_to(Path(local_path(outer)))
    a, b = absolute(outer).rstrip("/"), absolute(inner).rstrip("/")
    return b == a or b.startswith(a + "/")


def inside(base: str | Path, value: str) -> str | None:
    """``value`` (a path relative to ``base``) as a normalised relative POSIX path, or None when it
    escapes ``base`` (``..``, an absolute path, or — locally — a symlink leading out)."""
    if not is_uri(base):
        root = Path(local_path(base))
        cand = (root / value).resolve()
        try:
            return cand.relative_to(root).as_posix()
        except ValueError:
            return None
    rel = posixpath.normpath(value.replace("\\", "/"))
    if rel.startswith("/") or rel == ".." or rel.startswith("../") or _SCHEME.match(value):
        return None
    return rel


def public_env() -> dict[str, str]:
    """The object-store settings of this process that hold no secret (for Ray workers' environment)."""
    return {k: os.environ[k] for k in PUBLIC_ENV if os.environ.get(k)}
