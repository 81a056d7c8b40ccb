"""The patient-key salt: one lookup for ``prepare``, ``predict`` and ``explain``.

Patient keys and redacted file names are ``sha256(salt + identifier)``. Threat model: whoever holds
the salt and a cache can recompute the key of any Patient ID they can guess (a 7-digit MRN space
falls in seconds), so the salt is a secret that never sits beside what it protects; whoever holds
only the cache, a run or a report cannot reverse a key.

Where the salt comes from, first match wins:

1. ``XRAY_DIST_SALT`` (the environment);
2. ``--salt-file PATH_OR_URI`` (read; made there, random, when missing);
3. a cache made before salts left caches, which still holds ``CACHE/.salt``: used, with a
   warning saying how to move it out (its keys stay the same);
4. the per-user secret ``$XRAY_DIST_SECRETS_DIR/salt`` (default ``~/.config/xray-dist/salt``),
   made on first use with mode 0600 in a 0700 directory.

A salt shorter than :data:`MIN_BYTES` bytes (an empty file included) is refused, and a
``--salt-file`` inside the cache it salts is refused: a cache never contains its own salt. Every
salt this module creates locally is created 0600 from the start (no moment where it is readable
by others).
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from xray_dist.data.cache import CacheLayout
from xray_dist.errors import XrayDistError
from xray_dist.infra import storage

log = logging.getLogger(__name__)

ENV = "XRAY_DIST_SALT"
SECRETS_DIR_ENV = "XRAY_DIST_SECRETS_DIR"
#: The shortest salt accepted, in bytes (128 bits).
MIN_BYTES = 16


class SaltError(XrayDistError):
    """A salt that would not protect the keys (too short, or kept inside the cache)."""


def user_salt_file() -> Path:
    """The per-user default salt file (``XRAY_DIST_SECRETS_DIR``, else ``~/.config/xray-dist``)."""
    base = os.environ.get(SECRETS_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config"), "xray-dist")
    return Path(base) / "salt"


def _checked(salt: str, where: str) -> str:
    salt = salt.strip()
    if len(salt.encode()) < MIN_BYTES:
        raise SaltError(f"{where}: the salt is {len(salt.encode())} bytes; at least {MIN_BYTES} are needed "
                        "(a short or empty salt lets anyone recompute the patient keys)")
    return salt


def _create_local(path: Path) -> str:
    """A new random salt at ``path``, created 0600 (its folder 0700 when made here); if another
    process made it first, theirs."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    salt = secrets.token_hex(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(salt)
    try:  # whole or absent: a process that loses the race reads the winner's complete salt
        os.link(tmp, path)
    except FileExistsError:
        return _checked(path.read_text(), str(path))
    finally:
        tmp.unlink(missing_ok=True)
    return salt


def _read_or_create(path: str, create: bool) -> str | None:
    try:
        return _checked(storage.read_text(path), path)
    except FileNotFoundError:
        pass
    if not create:
        return None
    if storage.is_uri(path):
        salt = secrets.token_hex(32)
        storage.write_text(path, salt)
        return salt
    return _create_local(Path(path))


def resolve(salt_file: str | None = None, cache: str | None = None, create: bool = True) -> str:
    """The salt for a command writing ``cache`` (``prepare``) or none (``predict``, ``explain``);
    see the module's docstring for the order. Raises :class:`SaltError` for a salt that would not
    protect the keys."""
    env = os.environ.get(ENV)
    if env is not None:
        return _checked(env, ENV)
    if salt_file:
        if cache and storage.contains(cache, salt_file):
            raise SaltError(f"--salt-file {salt_file} is inside the cache {cache}: keep the salt apart from the keys "
                            "it protects")
        salt = _read_or_create(salt_file, create)
        if salt is None:
            raise SaltError(f"--salt-file {salt_file}: no such file")
        return salt
    if cache:
        legacy = CacheLayout(cache).legacy_salt  # read for compatibility, never written
        try:
            salt = _checked(storage.read_text(legacy), legacy)
        except FileNotFoundError:
            salt = None
        if salt is not None:
            log.warning("%s holds its own salt, beside the keys it protects: move it out (e.g. `mv %s ~/secure/salt`) "
                        "and pass --salt-file ~/secure/salt (or set %s); the keys stay the same", cache, legacy, ENV)
            return salt
    salt = _read_or_create(str(user_salt_file()), create)
    if salt is None:
        raise SaltError(f"no salt: set {ENV}, give --salt-file, or let xray-dist make {user_salt_file()}")
    return salt
