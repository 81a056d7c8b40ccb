"""``prepare``'s decoding: every labelled file read once, in parallel Ray tasks, into the cache's
Parquet chunks (:mod:`xray_dist.data.cache` names them).

A file that cannot be used becomes a row with its error (kind and reason), never a failed run; a
decode process that is killed (out of memory, most often) has its chunk decoded again one file per
task, so only the files that kill their process are quarantined.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from xray_dist.config import PrepareConfig, PreprocessSpec, stable_hash
from xray_dist.data.cache import RETRY, ATTRIBUTE_COLUMNS, CacheLayout, read_marker, recorded_chunks
from xray_dist.data.dicom import named_failures, read_dataset, to_model_input
from xray_dist.data.paths import PathNames
from xray_dist.data import dicomweb, subgroups
from xray_dist.data.patients import patient_key_and_source
from xray_dist.errors import DicomReadError, RetrieveError
from xray_dist.infra import storage
from xray_dist.infra.console import Progress
from xray_dist.infra.runtime import init_ray

log = logging.getLogger(__name__)

#: Files fetched ahead of the one being decoded, when they come from an object store.
PREFETCH = 3

#: Fault injection for tests (the storage engines' habit): a file whose relative path contains this
#: variable's value (read where prepare runs, handed to its tasks) makes its decoding process die by
#: SIGKILL, as the kernel's or Ray's out-of-memory killer ends a process. Unset in normal use.
FAULT_KILL_ENV = "XRAY_DIST_FAULT_KILL_ON"




def read_for_cache(path: str | Path, spec: PreprocessSpec, salt: str,
                   data: bytes | None = None) -> tuple[np.ndarray, str, str, dict[str, str]]:
    """Read once: the model input, the salted patient key, what the key was made from, and the
    subgroup attributes the header gives (:func:`xray_dist.data.subgroups.from_header`; the view
    upper-cased, empty when absent) (``data``: the file's bytes, when already fetched)."""
    ds = read_dataset(path, data, spec.max_pixels)
    with named_failures(path, "the image"):
        key, source = patient_key_and_source(ds, salt, fallback=str(path))
        return to_model_input(ds, spec, path), key, source, subgroups.from_header(ds, salt)


def decode_batch(batch: dict[str, np.ndarray], spec_dict: dict, salt: str,
                 names: PathNames = PathNames(), fetch=None) -> dict[str, np.ndarray]:
    """Decode each file of ``batch`` (``path``: the file's name in outputs, ``rel``: its path in the
    data directory, ``abspath``: where it is read); a bad file becomes a row with its error, the
    error's text scrubbed of the file's path (:meth:`~xray_dist.data.paths.PathNames.scrub`).
    ``fetch``: ``rel`` → bytes, for sources that are not files (a DICOMweb archive: a failed
    retrieve quarantines that instance with the reason)."""
    spec = PreprocessSpec.from_dict(spec_dict)
    s = spec.image_size
    n = len(batch["path"])
    images = np.zeros((n, s, s), dtype=np.uint8)
    patients, sources, kinds, errors = [], [], [], []
    attrs: dict[str, list[str]] = {a: [] for a in ATTRIBUTE_COLUMNS}
    rels = batch.get("rel", batch["path"])
    fetched = _fetched(rels, fetch) if fetch is not None else _prefetched(batch["abspath"])
    for i, (rel, full, data) in enumerate(zip(rels, batch["abspath"], fetched)):
        try:
            if isinstance(data, BaseException) and fetch is not None:  # a 404 or 403 is this file's fault
                raise (RetrieveError if isinstance(data, dicomweb.Unavailable) else DicomReadError)(
                    full, f"could not retrieve it: {data}")
            if isinstance(data, BaseException):
                data = None  # read it again where it is decoded: a failure then gets its usual reason
            images[i], key, source, found = read_for_cache(str(full), spec, salt, data)
            patients.append(key)
            sources.append(source)
            for a in ATTRIBUTE_COLUMNS:
                attrs[a].append(found[a])
            kinds.append("")
            errors.append("")
        except DicomReadError as e:
            patients.append("")
            sources.append("")
            for a in ATTRIBUTE_COLUMNS:
                attrs[a].append("")
            kinds.append(e.kind)
            errors.append(names.scrub(e.reason, full, rel))
        except Exception as e:  # noqa: BLE001 - an unforeseen failure still quarantines only this file
            patients.append("")
            sources.append("")
            for a in ATTRIBUTE_COLUMNS:
                attrs[a].append("")
            kinds.append("unexpected")
            errors.append(names.scrub(f"{type(e).__name__}: {e}", full, rel))
            log.warning("unexpected error decoding %s: %s", names.name(rel), errors[-1])
    return {
        "path": np.asarray(batch["path"], dtype=object),
        "patient": np.asarray(patients, dtype=object),
        "patient_source": np.asarray(sources, dtype=object),
        **{a: np.asarray(v, dtype=object) for a, v in attrs.items()},
        "image": images,
        "error_kind": np.asarray(kinds, dtype=object),
        "error": np.asarray(errors, dtype=object),
    }


def _fetched(rels, fetch) -> "Iterator[bytes | BaseException]":
    """Each item's bytes from ``fetch``, one at a time (an archive's connections are bounded by the
    decode tasks in flight, :func:`decode_all`), or the exception that fetching it raised."""
    for rel in rels:
        try:
            yield fetch(str(rel))
        except Exception as e:  # noqa: BLE001 - this item's failure, named by the decoder
            yield e


def _prefetched(paths) -> "Iterator[bytes | BaseException | None]":
    """Each file's bytes, fetched by a few threads ahead of the decoder for object-store paths
    (so a GET's latency overlaps the previous file's decode); ``None`` (read when decoded) for local
    files, which are read faster than a thread hands them over. A failed fetch yields its exception
    (the decoder reads that file again itself, so it fails, if it does, with the usual reason)."""
    paths = [str(p) for p in paths]
    if not any(storage.is_uri(p) for p in paths):
        yield from (None for _ in paths)
        return

    def fetch(p: str):
        try:
            return storage.read_bytes(p)
        except BaseException as e:  # noqa: BLE001 - handed to the decoder, which names the file
            return e

    with ThreadPoolExecutor(PREFETCH) as pool:
        pending = [pool.submit(fetch, p) for p in paths[:PREFETCH]]
        for i in range(len(paths)):
            if i + PREFETCH < len(paths):
                pending.append(pool.submit(fetch, paths[i + PREFETCH]))
            yield pending[i].result()
            pending[i] = None  # its bytes are the decoder's now


def decode_chunks(rels: list[str], sizes: dict[str, int], cpus: int) -> list[list[str]]:
    """Files grouped into decode tasks: largest first (longest-processing-time-first, so the last
    tasks are short and no CPU idles long at the end), several tasks per CPU, at most 64 files each
    (one Parquet file per task: large datasets get files of a few MB, not thousands of tiny ones)."""
    ordered = sorted(rels, key=lambda r: (-sizes[r], r))
    per = max(1, min(64, -(-len(ordered) // (cpus * 4))))
    return [ordered[i:i + per] for i in range(0, len(ordered), per)]


def _decode_rows(rels: list[str], data_dir: str, spec_dict: dict, salt: str, names: PathNames,
                 fault: str | None = None, creds: dicomweb.Credentials | None = None) -> dict:
    if fault and any(fault in r for r in rels):
        os.kill(os.getpid(), signal.SIGKILL)
    fetch = None
    if dicomweb.is_source(data_dir):  # an archive: each instance retrieved (WADO-RS) where it is decoded
        fetch = functools.partial(dicomweb.retrieve, data_dir, creds=creds or dicomweb.Credentials())
        where = [dicomweb.location(data_dir, r) for r in rels]
    else:
        where = [storage.join(data_dir, r) for r in rels]
    batch = {"path": np.asarray([names.name(r) for r in rels], dtype=object), "rel": np.asarray(rels, dtype=object),
             "abspath": np.asarray(where, dtype=object)}
    return decode_batch(batch, spec_dict, salt, names, fetch)


def _write_rows(rows: dict, dest: str) -> None:
    from ray.data.block import BlockAccessor  # Ray: runs in a Ray task, which has Ray loaded already

    table = BlockAccessor.batch_to_block(rows)  # Ray Data's tensor columns
    storage.write_parquet(table, dest)  # whole or absent: a rerun after a crash redoes only the missing chunks


def _decode_chunk(rels: list[str], data_dir: str, spec_dict: dict, salt: str, dest: str,
                  names: PathNames = PathNames(), fault: str | None = None,
                  creds: dicomweb.Credentials | None = None) -> int:
    """Ray task body: decode a chunk of files (:func:`decode_batch`) and write them as one Parquet file."""
    _write_rows(_decode_rows(rels, data_dir, spec_dict, salt, names, fault, creds), dest)
    return len(rels)


def _killed_row(rel: str, spec_dict: dict, names: PathNames, why: str) -> dict:
    """The quarantine row of a file whose decoding process was killed."""
    s = PreprocessSpec.from_dict(spec_dict).image_size
    return {"path": np.asarray([names.name(rel)], dtype=object), "patient": np.asarray([""], dtype=object),
            "patient_source": np.asarray([""], dtype=object),
            **{a: np.asarray([""], dtype=object) for a in ATTRIBUTE_COLUMNS},
            "image": np.zeros((1, s, s), dtype=np.uint8), "error_kind": np.asarray(["killed"], dtype=object),
            "error": np.asarray([why], dtype=object)}


def _decode_one_by_one(rels: list[str], data_dir: str, spec_dict: dict, salt: str, dest: str,
                       names: PathNames, cause: BaseException, fault: str | None = None,
                       creds: dicomweb.Credentials | None = None, at_once: int | None = None) -> int:
    """A chunk whose process was killed (out of memory, most often): each file again in a task of
    its own, so the files that kill their process are found and quarantined with that reason
    while the rest are used; written as the chunk's Parquet file, as a whole chunk would be.
    ``at_once``: the most tasks in flight (an archive's --dicomweb-connections)."""
    import ray as _ray  # Ray: only prepare's driver, once Ray is started

    one = _ray.remote(num_cpus=1, max_retries=1)(_decode_rows)
    why = ("its decoding process was killed (out of memory)" if isinstance(cause, _ray.exceptions.OutOfMemoryError)
           else "its decoding process was killed (out of memory or a signal; see the log)")
    parts = []
    step = at_once or len(rels)
    for i in range(0, len(rels), step):
        group = rels[i:i + step]
        futures = [one.remote([r], data_dir, spec_dict, salt, names, fault, creds) for r in group]
        for rel, f in zip(group, futures):
            try:
                parts.append(_ray.get(f))
            except (_ray.exceptions.OutOfMemoryError, _ray.exceptions.WorkerCrashedError) as e:
                log.warning("%s: %s", names.name(rel), why)
                log.debug("%s: %s", names.name(rel), type(e).__name__)
                parts.append(_killed_row(rel, spec_dict, names, why))
    rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    _write_rows(rows, dest)
    return len(rels)


@dataclass(frozen=True)
class Decoded:
    chunks: list[str]  # every chunk file of these inputs
    decoded: int  # files decoded by this run (the rest were in chunks already written)
    retry: list[str]  # chunks with instances that could not be retrieved


def archive_chunks(rels: list[str], per: int = 64) -> list[list[str]]:
    """An archive's instances (``STUDY/SERIES/SOP.dcm``) grouped by series, at most ``per`` each, in
    UID order: instances that arrive later fall into chunks of their own series, so a rerun decodes
    only them (:func:`decode_all`)."""
    by_series: dict[str, list[str]] = {}
    for rel in sorted(rels):
        by_series.setdefault(rel.split("/")[1], []).append(rel)
    return [s[i:i + per] for s in by_series.values() for i in range(0, len(s), per)]


def decode_all(cfg: PrepareConfig, rels: list[str], sizes: dict[str, int], layout: CacheLayout, salt: str,
               key: str, names: PathNames = PathNames(), earlier: list[str] = (),
               item_key: str | None = None) -> Decoded:
    """Decode every file once, one Ray task per chunk (1 CPU each), each writing its own Parquet
    file into the cache's images. ``earlier``: chunks a previous prepare recorded, read before its
    completion marker was removed. ``item_key`` (an archive: the settings without the list of
    instances): chunks by series (:func:`archive_chunks`), named by their own instances, so those
    already decoded are kept and only new instances are decoded; a chunk with an instance the
    archive did not hand over is decoded again next time (:data:`RETRY`).

    Plain Ray tasks rather than a Ray Data pipeline: the work is one independent map with nothing
    downstream, and on this project's 2-CPU machines the tasks finished the same decodes 25–30 %
    sooner (BENCHMARKS.md). Chunks already written by an interrupted prepare of the same inputs are
    kept; files from anything else are removed.
    """
    import ray as _ray  # Ray: only prepare's driver, never on the CLI's import

    ray = init_ray(cfg.address, cfg.num_cpus)
    data_dir = cfg.data_dir if dicomweb.is_source(cfg.data_dir) else storage.absolute(cfg.data_dir)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    chunks = archive_chunks(rels) if item_key else decode_chunks(rels, sizes, cpus)
    storage.makedirs(layout.images)
    chunk_files = [f"chunk-{stable_hash({'key': item_key or key, 'files': c})}.parquet" for c in chunks]
    wanted = set(chunk_files)
    retry_file = storage.join(layout.images, RETRY)
    retried = set((read_marker(retry_file) or {}).get("chunks", []))
    here = {f.rel for f in storage.list_files(layout.images)}
    listed = here - retried  # a chunk to retry is decoded again
    recorded = set(recorded_chunks(layout.images)) | set(earlier)
    for rel in sorted((recorded - wanted) & here):  # chunks of other inputs, recorded by an earlier prepare
        storage.delete_file(layout.chunk(rel))
    # recorded before any is written: the only files a later prepare may delete (nothing else, ever)
    storage.write_json(layout.written, {"chunks": sorted(wanted)})
    present = wanted & listed
    todo = [(c, n) for c, n in zip(chunks, chunk_files) if n not in present]
    if len(todo) < len(chunks):
        log.info("resuming: %d of %d chunks already decoded", len(chunks) - len(todo), len(chunks))
    task = _ray.remote(num_cpus=1, max_retries=1)(_decode_chunk)
    spec = cfg.preprocess.to_dict()
    fault = os.environ.get(FAULT_KILL_ENV)
    # an archive: its credentials go to the tasks as an argument (as the salt does), and at most
    # --dicomweb-connections tasks retrieve from it at once
    creds = dicomweb.Credentials.from_env() if dicomweb.is_source(data_dir) else None
    in_flight = cfg.dicomweb_connections if creds is not None else len(todo)
    queue = list(todo)
    work: dict = {}
    if creds is not None:  # until a chunk is known whole, it is one to decode again (a prepare cut off here)
        storage.write_json(retry_file, {"chunks": sorted(retried | {n for _, n in todo})})

    def submit() -> None:
        while queue and len(work) < in_flight:
            c, n = queue.pop(0)
            work[task.remote(c, data_dir, spec, salt, layout.chunk(n), names, fault, creds)] = (c, n)

    submit()
    with Progress(sum(len(c) for c, _ in todo), "prepare: decode") as bar:
        while work:
            done, _ = _ray.wait(list(work), num_returns=1)
            c, n = work.pop(done[0])
            try:
                bar.update(_ray.get(done[0]))
            except (_ray.exceptions.OutOfMemoryError, _ray.exceptions.WorkerCrashedError) as e:
                # a killed process: find the file(s) that did it, keep the rest
                log.warning("a decode task of %d files was killed (%s); decoding them one by one", len(c),
                            type(e).__name__)
                bar.update(_decode_one_by_one(c, data_dir, spec, salt, layout.chunk(n), names, e, fault, creds,
                                              in_flight if creds is not None else None))
            submit()
    retry = []
    if creds is not None:
        retry = sorted(n for _, n in todo if _retrieve_failed(layout.chunk(n)))
        storage.write_json(retry_file, {"chunks": retry})
    return Decoded(chunk_files, sum(len(c) for c, _ in todo), retry)


def _retrieve_failed(chunk: str) -> bool:
    with storage.local_copy(chunk) as local:
        kinds = pq.read_table(local, columns=["error_kind"]).column("error_kind").to_pylist()
    return RetrieveError.kind in kinds
