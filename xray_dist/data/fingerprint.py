"""Pinned inputs: a prepared cache's fingerprint, recorded by what was made from it.

``prepare`` writes ``CACHE/fingerprint.json`` (a record for people; readers recompute it): a hash
of each part of what a run depends on — the decoded images (the images key: every file's path,
size and modification time, the preprocessing spec and the salt), the preprocessing spec, the
split of every image, the label of every image — and one ``id`` over all of them. A run or sweep
records the fingerprint of the cache it started from (``RUN/inputs.json``); resuming it against a
cache whose fingerprint differs is refused, naming what changed, since the run would otherwise go
on training on what used to be validation patients, or on other labels or pixels, without a word.

The cache is read through :mod:`xray_dist.data.cache`.
"""

from __future__ import annotations

import hashlib
import json

from xray_dist.data.cache import CacheLayout, images_key, load_manifest, load_spec
from xray_dist.errors import CacheError
from xray_dist.infra import storage

#: A run's or sweep's record of the cache it was made from (``TARGET/inputs.json``).
INPUTS = "inputs.json"

#: The parts of a fingerprint, in the order a change is reported, with what a change to each means.
PARTS = {
    "images": "the decoded images (other files, or files changed since)",
    "preprocess": "the preprocessing spec (image size, windowing, JPEG 2000 reduction)",
    "splits": "the train/validation/test split (patients moved between splits: another --seed, "
              "--val-fraction or --test-fraction)",
    "labels": "the labels",
}


def _digest(rows) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:20]


def compute(manifest, spec: dict, images_key: str) -> dict:
    """The fingerprint of a manifest table (path, split, label, patient), spec and images key."""
    paths = manifest.column("path").to_pylist()
    splits = manifest.column("split").to_pylist()
    labels = manifest.column("label").to_pylist()
    order = sorted(range(len(paths)), key=paths.__getitem__)
    parts = {
        "images": images_key,
        "preprocess": _digest([spec]),
        "splits": _digest([paths[i], splits[i]] for i in order),
        "labels": _digest([paths[i], labels[i]] for i in order),
    }
    return {"id": _digest([parts]), **parts}


def write(cache: str, fp: dict) -> None:
    """Write ``CACHE/fingerprint.json`` (prepare, after the manifest)."""
    storage.write_json(CacheLayout(cache).fingerprint, fp, indent=2)


def of_cache(cache: str) -> dict:
    """The cache's fingerprint, computed from what the cache holds now (its manifest, spec and
    images key), never taken from ``fingerprint.json`` alone: a prepare that crashed between writing
    a new manifest and its fingerprint would otherwise pass a re-split cache as the old one."""
    manifest = load_manifest(cache)
    return compute(manifest, load_spec(cache).to_dict(), images_key(cache))


def changes(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints, in words (empty when they are the same)."""
    if old.get("id") == new.get("id"):
        return []
    return [PARTS[p] for p in PARTS if old.get(p) != new.get(p)] or ["the cache"]


def record(target: str, cache: str, fp: dict) -> None:
    """Write ``TARGET/inputs.json``: the cache a run or sweep was made from and its fingerprint."""
    storage.write_json(storage.join(target, INPUTS), {"cache": cache, "cache_fingerprint": fp}, indent=2)


def recorded_cache(target: str) -> str | None:
    """The cache ``TARGET/inputs.json`` says the run or sweep was made from (None when it has none)."""
    try:
        return storage.read_json(storage.join(target, INPUTS))["cache"]
    except FileNotFoundError:
        return None


def recorded(target: str) -> dict | None:
    """The fingerprint ``TARGET/inputs.json`` recorded (None when the run or sweep has none)."""
    try:
        return storage.read_json(storage.join(target, INPUTS))["cache_fingerprint"]
    except FileNotFoundError:
        return None


def check_unchanged(target: str, cache: str, what: str) -> dict:
    """The cache's fingerprint, after checking it is the one ``target`` (a run or sweep being
    resumed) recorded; a changed cache is a :class:`CacheError` naming every change."""
    fp = of_cache(cache)
    old = recorded(target)
    if old is None:
        return fp
    diff = changes(old, fp)
    if diff:
        raise CacheError(f"--cache {cache} changed since the {what} in {target} started from it: "
                         + "; ".join(diff) + ". Resuming would mix the two; use a new --out, or prepare the "
                         "cache again with the settings it had")
    return fp
