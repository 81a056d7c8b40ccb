"""``prepare``: scan → decode once in parallel (Ray tasks) → Parquet cache → patient split → report.

The cache's layout and its readers live in :mod:`xray_dist.data.cache`.

The cache holds no salt (xray_dist.data.salt keeps it apart), and it never overlaps its inputs: a cache
inside the data directory, or around it, is refused before anything is listed or written.

The decoded images depend only on the files and the preprocessing spec; labels and the split live
in the manifest, so changing ``--seed`` or the fractions re-splits without decoding anything.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from xray_dist.data import fingerprint
from xray_dist.data.cache import (COMPLETE, IMAGES_DIR, MANIFEST, REPORT, SPEC, WRITTEN, read_image_meta, read_marker,
                                   recorded_chunks)
from xray_dist.infra import storage
from xray_dist.config import PrepareConfig, PreprocessSpec, stable_hash
from xray_dist.data.dicom import read_for_cache
from xray_dist.errors import CacheError, DicomReadError, PrepareError
from xray_dist.data.classes import finding_counts, is_multilabel_label
from xray_dist.data.labels import NEGATIVE, list_entries, scan_labels
from xray_dist.infra.locks import LOCK, TargetLock
from xray_dist.data.paths import RELATIVE, PathNames, write_path_map
from xray_dist.data.salt import resolve as resolve_salt
from xray_dist.data.splits import (canonical_names, fixed_splits, patient_labels, read_split_files, split_fingerprint,
                              split_patients)

log = logging.getLogger(__name__)


def decode_batch(batch: dict[str, np.ndarray], spec_dict: dict, salt: str,
                 names: PathNames = PathNames()) -> dict[str, np.ndarray]:
    """Decode each file of ``batch`` (``path``: the file's name in outputs, ``rel``: its path in the
    data directory, ``abspath``: where it is read); a bad file becomes a row with its error, the
    error's text scrubbed of the file's path (:meth:`~xray_dist.data.paths.PathNames.scrub`)."""
    spec = PreprocessSpec.from_dict(spec_dict)
    s = spec.image_size
    n = len(batch["path"])
    images = np.zeros((n, s, s), dtype=np.uint8)
    patients, sources, views, kinds, errors = [], [], [], [], []
    rels = batch.get("rel", batch["path"])
    for i, (rel, full, data) in enumerate(zip(rels, batch["abspath"], _prefetched(batch["abspath"]))):
        try:
            if isinstance(data, BaseException):
                data = None  # read it again where it is decoded: a failure then gets its usual reason
            images[i], key, source, view = read_for_cache(str(full), spec, salt, data)
            patients.append(key)
            sources.append(source)
            views.append(view)
            kinds.append("")
            errors.append("")
        except DicomReadError as e:
            patients.append("")
            sources.append("")
            views.append("")
            kinds.append(e.kind)
            errors.append(names.scrub(e.reason, full, rel))
        except Exception as e:  # noqa: BLE001 - an unforeseen failure still quarantines only this file
            patients.append("")
            sources.append("")
            views.append("")
            kinds.append("unexpected")
            errors.append(names.scrub(f"{type(e).__name__}: {e}", full, rel))
            log.warning("unexpected error decoding %s: %s", names.name(rel), errors[-1])
    return {
        "path": np.asarray(batch["path"], dtype=object),
        "patient": np.asarray(patients, dtype=object),
        "patient_source": np.asarray(sources, dtype=object),
        "view": np.asarray(views, dtype=object),
        "image": images,
        "error_kind": np.asarray(kinds, dtype=object),
        "error": np.asarray(errors, dtype=object),
    }


#: Files fetched ahead of the one being decoded, when they come from an object store.
PREFETCH = 3


def _prefetched(paths) -> "Iterator[bytes | BaseException | None]":
    """Each file's bytes, fetched by a few threads ahead of the decoder for object-store paths
    (so a GET's latency overlaps the previous file's decode); ``None`` (read when decoded) for local
    files, which are read faster than a thread hands them over. A failed fetch yields its exception
    (the decoder reads that file again itself, so it fails, if it does, with the usual reason)."""
    from concurrent.futures import ThreadPoolExecutor

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


def _images_key(data_dir: str, rels: list[str], stats: dict[str, tuple[int, int]], spec: PreprocessSpec,
                salt: str, paths: str = RELATIVE) -> str:
    """The decoded images' key: the data location, every file's (path, size, mtime), the spec, the
    salt, how files are named."""
    files = [[rel, *stats[rel]] for rel in rels]
    # "rows": what each decoded row holds; 2 added the view (caches decoded before are decoded again)
    return stable_hash({"data_dir": storage.absolute(data_dir), "files": files, "spec": spec.to_dict(),
                        "salt": stable_hash(salt), "rows": 2, **({"paths": paths} if paths != RELATIVE else {})})


def _check_cache_dir(cache: str) -> None:
    """A non-empty ``--out`` must be a cache: one that holds this module's own records (a folder
    that merely has an ``images`` entry is somebody's data, not a cache)."""
    files = {e.rel for e in storage.list_files(cache, limit=100000) if not e.rel.startswith(LOCK)}  # lock + its temps
    ours = {SPEC, f"{IMAGES_DIR}/{COMPLETE}", f"{IMAGES_DIR}/{WRITTEN}"}
    if files and not (files & ours):
        raise PrepareError(f"--out {cache} exists and is not an xray-dist cache; choose an empty or new directory")


def _check_apart(cfg: PrepareConfig, data_dir: str, cache: str) -> None:
    """The cache and the inputs never overlap: prepare writes (and cleans up) only inside its
    cache, so a cache that is the data directory, inside it or around it, or that holds an input
    file, is refused before anything is listed or written."""
    if storage.contains(data_dir, cache) or storage.contains(cache, data_dir):
        how = ("is" if storage.absolute(cache) == data_dir else
               "is inside" if storage.contains(data_dir, cache) else "contains")
        raise PrepareError(f"--out {cache} {how} the data directory {data_dir}: prepare writes only into a cache apart "
                           "from its inputs; choose a directory outside the data")
    for flag, f in (("--labels", cfg.labels), ("--metadata", cfg.metadata),
                    *(("--split-file", x) for x in cfg.split_files), ("--path-map", cfg.path_map)):
        if f and storage.contains(cache, storage.absolute(f)):
            raise PrepareError(f"{flag} {f} is inside the cache {cache}: keep inputs and private files apart from it")


def decode_chunks(rels: list[str], sizes: dict[str, int], cpus: int) -> list[list[str]]:
    """Files grouped into decode tasks: largest first (longest-processing-time-first, so the last
    tasks are short and no CPU idles long at the end), several tasks per CPU, at most 64 files each
    (one Parquet file per task: large datasets get files of a few MB, not thousands of tiny ones)."""
    ordered = sorted(rels, key=lambda r: (-sizes[r], r))
    per = max(1, min(64, -(-len(ordered) // (cpus * 4))))
    return [ordered[i:i + per] for i in range(0, len(ordered), per)]


#: Fault injection for tests (the storage engines' habit): a file whose relative path contains this
#: variable's value (read where prepare runs, handed to its tasks) makes its decoding process die by
#: SIGKILL, as the kernel's or Ray's out-of-memory killer ends a process. Unset in normal use.
FAULT_KILL_ENV = "XRAY_DIST_FAULT_KILL_ON"


def _decode_rows(rels: list[str], data_dir: str, spec_dict: dict, salt: str, names: PathNames,
                 fault: str | None = None) -> dict:
    if fault and any(fault in r for r in rels):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    batch = {"path": np.asarray([names.name(r) for r in rels], dtype=object), "rel": np.asarray(rels, dtype=object),
             "abspath": np.asarray([storage.join(data_dir, r) for r in rels], dtype=object)}
    return decode_batch(batch, spec_dict, salt, names)


def _write_rows(rows: dict, dest: str) -> None:
    from ray.data.block import BlockAccessor

    table = BlockAccessor.batch_to_block(rows)  # Ray Data's tensor columns
    storage.write_parquet(table, dest)  # whole or absent: a rerun after a crash redoes only the missing chunks


def _decode_chunk(rels: list[str], data_dir: str, spec_dict: dict, salt: str, dest: str,
                  names: PathNames = PathNames(), fault: str | None = None) -> int:
    """Ray task body: decode a chunk of files (:func:`decode_batch`) and write them as one Parquet file."""
    _write_rows(_decode_rows(rels, data_dir, spec_dict, salt, names, fault), dest)
    return len(rels)


def _killed_row(rel: str, spec_dict: dict, names: PathNames, why: str) -> dict:
    """The quarantine row of a file whose decoding process was killed."""
    s = PreprocessSpec.from_dict(spec_dict).image_size
    return {"path": np.asarray([names.name(rel)], dtype=object), "patient": np.asarray([""], dtype=object),
            "patient_source": np.asarray([""], dtype=object), "view": np.asarray([""], dtype=object),
            "image": np.zeros((1, s, s), dtype=np.uint8), "error_kind": np.asarray(["killed"], dtype=object),
            "error": np.asarray([why], dtype=object)}


def _decode_one_by_one(rels: list[str], data_dir: str, spec_dict: dict, salt: str, dest: str,
                       names: PathNames, cause: BaseException, fault: str | None = None) -> int:
    """A chunk whose process was killed (out of memory, most often): each file again in a task of
    its own, so the files that kill their process are found and quarantined with that reason
    while the rest are used; written as the chunk's Parquet file, as a whole chunk would be."""
    import ray as _ray

    one = _ray.remote(num_cpus=1, max_retries=1)(_decode_rows)
    why = ("its decoding process was killed (out of memory)" if isinstance(cause, _ray.exceptions.OutOfMemoryError)
           else "its decoding process was killed (out of memory or a signal; see the log)")
    futures = [one.remote([r], data_dir, spec_dict, salt, names, fault) for r in rels]
    parts = []
    for rel, f in zip(rels, futures):
        try:
            parts.append(_ray.get(f))
        except (_ray.exceptions.OutOfMemoryError, _ray.exceptions.WorkerCrashedError) as e:
            log.warning("%s: %s", names.name(rel), why)
            log.debug("%s: %s", names.name(rel), type(e).__name__)
            parts.append(_killed_row(rel, spec_dict, names, why))
    rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    _write_rows(rows, dest)
    return len(rels)


def _decode_all(cfg: PrepareConfig, rels: list[str], sizes: dict[str, int], images_dir: str, salt: str,
                key: str, names: PathNames = PathNames(), earlier: list[str] = ()) -> list[str]:
    """Decode every file once, one Ray task per chunk (1 CPU each), each writing its own Parquet file.
    ``earlier``: chunks a previous prepare recorded, read before its completion marker was removed.

    Plain Ray tasks rather than a Ray Data pipeline: the work is one independent map with nothing
    downstream, and on this project's 2-CPU machines the tasks finished the same decodes 25–30 %
    sooner (BENCHMARKS.md). Chunks already written by an interrupted prepare of the same inputs are
    kept; files from anything else are removed.
    """
    import ray as _ray

    from xray_dist.infra.console import Progress
    from xray_dist.infra.runtime import init_ray

    ray = init_ray(cfg.address, cfg.num_cpus)
    data_dir = storage.absolute(cfg.data_dir)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    chunks = decode_chunks(rels, sizes, cpus)
    storage.makedirs(images_dir)
    chunk_files = [f"chunk-{stable_hash({'key': key, 'files': c})}.parquet" for c in chunks]
    wanted = set(chunk_files)
    listed = {f.rel for f in storage.list_files(images_dir)}
    recorded = set(recorded_chunks(images_dir)) | set(earlier)
    for rel in sorted((recorded - wanted) & listed):  # chunks of other inputs, recorded by an earlier prepare
        storage.delete_file(storage.join(images_dir, rel))
    # recorded before any is written: the only files a later prepare may delete (nothing else, ever)
    storage.write_json(storage.join(images_dir, WRITTEN), {"chunks": sorted(wanted)})
    present = wanted & listed
    todo = [(c, n) for c, n in zip(chunks, chunk_files) if n not in present]
    if len(todo) < len(chunks):
        log.info("resuming: %d of %d chunks already decoded", len(chunks) - len(todo), len(chunks))
    task = _ray.remote(num_cpus=1, max_retries=1)(_decode_chunk)
    spec = cfg.preprocess.to_dict()
    fault = os.environ.get(FAULT_KILL_ENV)
    work = {task.remote(c, data_dir, spec, salt, storage.join(images_dir, n), names, fault): (c, n) for c, n in todo}
    pending = list(work)
    with Progress(sum(len(c) for c, _ in todo), "prepare: decode") as bar:
        while pending:
            done, pending = _ray.wait(pending, num_returns=1)
            try:
                bar.update(_ray.get(done[0]))
            except (_ray.exceptions.OutOfMemoryError, _ray.exceptions.WorkerCrashedError) as e:
                c, n = work[done[0]]  # a killed process: find the file(s) that did it, keep the rest
                log.warning("a decode task of %d files was killed (%s); decoding them one by one", len(c),
                            type(e).__name__)
                bar.update(_decode_one_by_one(c, data_dir, spec, salt, storage.join(images_dir, n), names, e, fault))
    return chunk_files


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run ``prepare`` and return the report (also written to ``CACHE/prepare_report.json``)."""
    t0 = time.time()
    data_dir = storage.absolute(cfg.data_dir)
    cache = storage.absolute(cfg.out)
    _check_apart(cfg, data_dir, cache)
    for where in (data_dir, cache, *[f for f in (cfg.labels, cfg.metadata) if f]):
        storage.check_location(where)
    if not storage.is_dir(data_dir):
        raise PrepareError(f"data directory not found: {data_dir}")
    entries = list_entries(data_dir)
    scan = scan_labels(data_dir, cfg.labels, cfg.path_column, cfg.label_column, entries, cfg.patient_column,
                       cfg.labels_format, cfg.uncertain, cfg.metadata)
    if not scan.items:
        raise PrepareError(
            f"no labelled files in {data_dir}: {len(scan.missing)} label rows without a usable file, "
            f"{len(scan.unlabeled)} unlabeled files" + (" (is --labels right?)" if cfg.labels else
                                                        " (expected DATA/<class>/**/*.dcm or --labels CSV)")
        )
    _check_cache_dir(cache)
    salt = resolve_salt(cfg.salt_file, cache)  # before anything is written: a refused salt leaves no trace
    with TargetLock(cache, "xray-dist prepare"):  # two prepares into one cache would mix their chunks
        return _prepare_into(cfg, t0, data_dir, cache, entries, scan, salt)


def _prepare_into(cfg: PrepareConfig, t0: float, data_dir: str, cache: str, entries: list, scan,
                  salt: str) -> dict[str, Any]:
    """:func:`prepare`'s work on the cache, under its lock."""
    storage.makedirs(cache)
    names = PathNames(cfg.paths, salt)  # how the cache and its report name files (relative or redacted)
    views = {v.strip().upper() for v in cfg.views}
    excluded = []  # files left out by --views, with the reason: listed in the report, never lost
    if views:  # a view the labels give decides before decoding (a lateral is never decoded)
        for rel, _ in scan.items:
            v = scan.views.get(rel)
            if v and v not in views:
                excluded.append({"path": names.name(rel), "reason": f"view {v} (from the labels) not in --views "
                                                                     f"{','.join(sorted(views))}"})
    left_out = {e["path"] for e in excluded}
    items = [(rel, lab) for rel, lab in scan.items if names.name(rel) not in left_out]
    rels = [rel for rel, _ in items]
    labels = {names.name(rel): lab for rel, lab in items}  # by the name the cache's rows carry
    stats = {e.rel: (e.size, e.mtime_ns) for e in entries}
    key = _images_key(data_dir, rels, stats, cfg.preprocess, salt, cfg.paths)
    if cfg.path_map:
        write_path_map(cfg.path_map, [storage.join(data_dir, e.rel) for e in entries] +
                       [m["path"] for m in scan.missing], [e.rel for e in entries] + [m["path"] for m in scan.missing],
                       names)
    images_dir = storage.join(cache, IMAGES_DIR)
    marker = storage.join(images_dir, COMPLETE)
    old = read_marker(marker)
    reused = old is not None and old.get("key") == key
    if not reused:
        if old is not None:
            log.info("cache %s was made from other inputs or settings; decoding again", images_dir)
            recorded = recorded_chunks(images_dir)  # read while the marker still lists them
            storage.delete_file(marker)  # no longer complete; its recorded chunks go in _decode_all
        log.debug("decoding %d files with Ray tasks", len(rels))
        chunks = _decode_all(cfg, rels, {r: stats[r][0] for r in rels}, images_dir, salt, key, names,
                             recorded if old is not None else [])
        storage.write_json(marker, {"key": key, "files": len(rels), "spec": cfg.preprocess.to_dict(),
                                    "chunks": chunks})
    else:
        log.info("reusing decoded images in %s (same inputs and preprocessing)", images_dir)
    storage.write_json(storage.join(cache, SPEC), cfg.preprocess.to_dict(), indent=2)

    meta = read_image_meta(cache).to_pylist()
    seen = {m["path"] for m in meta}
    lost = sorted(set(labels) - seen)
    if lost:  # a decode task that lost rows must never pass silently
        raise CacheError(f"{len(lost)} files have no row in {images_dir} (e.g. {lost[0]}); delete the cache and retry")
    meta = [m for m in meta if m["path"] in labels]
    decoded = {m["path"] for m in meta}
    if views:  # the rest by the DICOM header's View Position
        view_of = {names.name(rel): v for rel, v in scan.views.items()}
        for m in meta:
            if m["error"]:
                continue
            v = view_of.get(m["path"]) or m.get("view") or ""
            if v not in views:
                why = (f"view {v} (from the DICOM header) not in --views {','.join(sorted(views))}" if v else
                       "no view: no View Position (0018,5101) in the header and none in the labels")
                excluded.append({"path": m["path"], "reason": why})
        left_out = {e["path"] for e in excluded}
    ok = sorted((m for m in meta if not m["error"] and m["path"] not in left_out), key=lambda m: m["path"])
    quarantined = sorted(({"path": m["path"], "reason": f"{m['error_kind']}: {m['error']}"}
                          for m in meta if m["error"]), key=lambda q: q["path"])
    if not ok:
        raise PrepareError(
            f"none of the {len(meta)} labelled files could be used; first reasons: "
            + "; ".join(f"{q['path']}: {q['reason']}" for q in (quarantined + excluded)[:3])
        )

    if scan.patients:  # --patient-column, or the format's patient column: the labels name the patients
        from xray_dist.data.dicom import BY_LABELS, hash_patient

        patient_of = {names.name(rel): p for rel, p in scan.patients.items()}
        for m in ok:
            if patient_of.get(m["path"]):
                m["patient"], m["patient_source"] = hash_patient(salt, "labels:" + patient_of[m["path"]]), BY_LABELS
    grouped = dict(sorted(Counter(m.get("patient_source") or "unknown" for m in ok).items()))
    multilabel = scan.multilabel or any(is_multilabel_label(labels[m["path"]]) for m in ok)
    stratum = _primary_finding(labels[m["path"]] for m in ok) if multilabel else (lambda lab: lab)
    strata = patient_labels([(m["patient"], stratum(labels[m["path"]])) for m in ok])
    rel_of = {names.name(r): r for r in rels}
    # the patients' order before the seeded shuffle comes from their files, not their salted keys:
    # the same files and seed give the same split in any cache (names kept in memory only)
    order_names = canonical_names([(m["patient"], rel_of[m["path"]]) for m in ok])
    split_source = {"how": "drawn", "fixed_patients": 0, "drawn_patients": len(strata)}
    if cfg.split_files:  # official splits: fixed where the file says, drawn (train/val) for the rest
        split_of, split_source = _official_splits(cfg, ok, strata, salt, names, rel_of, order_names)
    else:
        split_of = split_patients(strata, cfg.val_fraction, cfg.test_fraction, cfg.seed, order_names)
    manifest = pa.table({
        "path": [m["path"] for m in ok],
        "split": [split_of[m["patient"]] for m in ok],
        "label": [labels[m["path"]] for m in ok],
        "patient": [m["patient"] for m in ok],
    })
    storage.write_parquet(manifest, storage.join(cache, MANIFEST))
    fp = fingerprint.compute(manifest, cfg.preprocess.to_dict(), key)
    fingerprint.write(cache, fp)  # what runs and sweeps made from this cache pin

    classes = Counter(manifest.column("label").to_pylist())
    if multilabel:  # images per finding (and without any): a cohort's label combinations are too many to list
        classes = Counter({f: n for f, n in finding_counts(classes.elements(), NEGATIVE).items()})
        classes[NEGATIVE] = sum(1 for lab in manifest.column("label").to_pylist() if lab == NEGATIVE)
    splits: dict[str, dict[str, int]] = {}
    for split in ("train", "val", "test"):
        rows = [i for i, s in enumerate(manifest.column("split").to_pylist()) if s == split]
        pats = {manifest.column("patient")[i].as_py() for i in rows}
        if rows or split != "test":
            splits[split] = {"images": len(rows), "patients": len(pats)}
    warnings = []
    biggest, n_big = Counter(m["patient"] for m in ok).most_common(1)[0]
    if len(ok) >= 10 and n_big > 0.2 * len(ok):
        how = next(m.get("patient_source") or "unknown" for m in ok if m["patient"] == biggest)
        warnings.append(f"{n_big} of {len(ok)} files ({n_big / len(ok):.0%}) share one patient key (made from their "
                        f"{how.replace('_', ' ')}): a placeholder such as ANONYMOUS? They all land in one split; "
                        "if the labels CSV knows the patients, use --patient-column")
    if len(classes) < 2:
        warnings.append(f"only one class ({next(iter(classes))}) has usable images; training needs two")
    if splits["val"]["images"] == 0 and cfg.val_fraction > 0:
        warnings.append("the validation split is empty (too few patients per class)")
    report = {
        "data_dir": names.location(data_dir),
        "labels": names.location(str(cfg.labels)) if cfg.labels else "folders",
        "paths": cfg.paths,
        "found": len(meta) + len({e["path"] for e in excluded} - decoded),
        "ok": len(ok),
        "quarantined": quarantined,
        "excluded": sorted(excluded, key=lambda e: e["path"]),
        "labels_format": cfg.labels_format,
        "task": "multilabel" if multilabel else "multiclass",
        **({"uncertain": cfg.uncertain} if cfg.labels_format in ("chexpert", "mimic") else {}),
        **({"views": sorted(views)} if views else {}),
        "missing": [{"path": names.name(m["path"]), "reason": m["reason"]} for m in scan.missing],
        "unlabeled": [names.name(rel) for rel in scan.unlabeled],
        "classes": dict(sorted(classes.items())),
        "splits": splits,
        "patients_grouped_by": grouped,
        "image_size": cfg.preprocess.image_size,
        "preprocess": cfg.preprocess.to_dict(),
        "split_settings": {"val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction, "seed": cfg.seed,
                           **split_source},
        "cache_reused": reused,
        "fingerprint": fp["id"],
        "split_fingerprint": split_fingerprint([(rel_of[m["path"]], split_of[m["patient"]]) for m in ok]),
        "warnings": warnings,
        "seconds": round(time.time() - t0, 2),
    }
    assert report["found"] == report["ok"] + len(quarantined) + len(excluded)
    storage.write_json(storage.join(cache, REPORT), report, indent=2)
    for w in warnings:
        log.warning(w)
    return report


def _primary_finding(labels) -> "Callable[[str], str]":
    """Multi-label strata: an image's most frequent finding in the cohort (or the negative class),
    so the split keeps each finding's share without one stratum per label combination."""
    from xray_dist.data.classes import finding_counts, parse_findings

    labels = list(labels)
    counts = finding_counts(labels, NEGATIVE)

    def stratum(label: str) -> str:
        present = parse_findings(label, NEGATIVE)[0]
        return min(present, key=lambda f: (-counts[f], f)) if present else label

    return stratum


def _official_splits(cfg: PrepareConfig, ok: list[dict], strata: dict[str, str], salt: str, names: PathNames,
                     rel_of: dict[str, str], order_names: dict[str, str]) -> tuple[dict[str, str], dict]:
    """Patient → split from ``--split-file``: fixed where it names a patient or a file of theirs
    (raw patient IDs are hashed as the cache's keys are), drawn (train/val, ``val_fraction``) for
    its ``train_val`` pool and for patients it does not name."""
    from xray_dist.data.dicom import hash_patient

    sf = read_split_files(list(cfg.split_files))
    by_key = {hash_patient(salt, kind + raw): split for raw, split in sf.by_patient.items()
              for kind in ("pid:", "labels:", "study:")}
    fixed = fixed_splits([{"path": m["path"], "rel": rel_of[m["path"]], "patient": m["patient"]} for m in ok], sf,
                         by_key)
    split_of = {p: s for p, s in fixed.items() if s != "train_val"}
    pool = {p: lab for p, lab in strata.items() if p not in split_of}
    split_of.update(split_patients(pool, cfg.val_fraction, 0.0, cfg.seed, order_names))
    return split_of, {"how": "split file", "split_files": [names.location(str(f)) for f in cfg.split_files],
                      "fixed_patients": len(strata) - len(pool), "drawn_patients": len(pool)}


# ---- reading the cache (training, sweeps, bench) -------------------------------------------------


