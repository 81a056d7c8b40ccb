"""``prepare``: scan → decode once in parallel (Ray tasks) → Parquet cache → patient split → report.

The steps, in order: check the inputs and the cache apart (:func:`prepare`), select the labelled
files (``--views`` by the labels), decode them or reuse the images (:mod:`xray_dist.data.decode`),
sort the rows into used, quarantined and excluded (``--views`` by the header), key patients by the
labels where they name them, split by patient, write the manifest, its fingerprint and the report.

The cache's layout and its readers live in :mod:`xray_dist.data.cache`. The cache holds no salt
(:mod:`xray_dist.data.salt` keeps it apart), and it never overlaps its inputs: a cache inside the
data directory, or around it, is refused before anything is listed or written.

The decoded images depend only on the files and the preprocessing spec; labels and the split live
in the manifest, so changing ``--seed`` or the fractions re-splits without decoding anything.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa

from xray_dist.config import PrepareConfig, PreprocessSpec, stable_hash
from xray_dist.data import dicomweb, fingerprint, subgroups
from xray_dist.data.cache import OWN_FILES, CacheLayout, read_image_meta, read_marker, recorded_chunks
from xray_dist.data.classes import finding_counts, is_multilabel_label, parse_findings
from xray_dist.data.decode import decode_all
from xray_dist.data.labels import ACCESSION, NEGATIVE, LabelColumns, LabelScan, list_entries, scan_labels
from xray_dist.data.paths import RELATIVE, PathNames, write_path_map
from xray_dist.data.patients import BY_LABELS, keys_of_raw_id, labels_key
from xray_dist.data.salt import resolve as resolve_salt
from xray_dist.data.splits import (canonical_names, fixed_splits, patient_labels, read_split_files, split_fingerprint,
                                   split_patients)
from xray_dist.errors import CacheError, PrepareError
from xray_dist.infra import storage
from xray_dist.infra.locks import LOCK, TargetLock

log = logging.getLogger(__name__)


def _images_key(data_dir: str, rels: list[str], stats: dict[str, tuple[int, int]], spec: PreprocessSpec,
                salt: str, paths: str = RELATIVE) -> str:
    """The decoded images' key: the data location, every file's (path, size, mtime), the spec, the
    salt, how files are named."""
    files = [[rel, *stats[rel]] for rel in rels]
    # "rows": what each decoded row holds; 2 added the view, 3 the subgroup attributes (caches decoded
    # before are decoded again)
    return stable_hash({"data_dir": storage.absolute(data_dir), "files": files, "spec": spec.to_dict(),
                        "salt": stable_hash(salt), "rows": 3, **({"paths": paths} if paths != RELATIVE else {})})


def _check_cache_dir(cache: str) -> None:
    """A non-empty ``--out`` must be a cache: one that holds this module's own records (a folder
    that merely has an ``images`` entry is somebody's data, not a cache)."""
    files = {e.rel for e in storage.list_files(cache, limit=100000) if not e.rel.startswith(LOCK)}  # lock + its temps
    if files and not (files & OWN_FILES):
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
    for flag, f in (("--labels", cfg.labels), ("--metadata", cfg.metadata), ("--mimic-patients", cfg.mimic_patients),
                    *(("--split-file", x) for x in cfg.split_files), ("--path-map", cfg.path_map)):
        if f and storage.contains(cache, storage.absolute(f)):
            raise PrepareError(f"{flag} {f} is inside the cache {cache}: keep inputs and private files apart from it")


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run ``prepare`` and return the report (also written to ``CACHE/prepare_report.json``)."""
    t0 = time.time()
    archive = dicomweb.is_source(cfg.data_dir)
    if archive:
        cfg = _archive_config(cfg)
    data_dir = dicomweb.Source.parse(cfg.data_dir).uri if archive else storage.absolute(cfg.data_dir)
    cache = storage.absolute(cfg.out)
    _check_apart(cfg, data_dir, cache)
    for where in ((*([] if archive else [data_dir]), cache, *[f for f in (cfg.labels, cfg.metadata,
                                                                        cfg.mimic_patients) if f])):
        storage.check_location(where)
    studies_of_accession = None
    if archive:  # QIDO-RS on the driver: only the instances' UIDs are kept (and, to join labels, accessions)
        by_accession = cfg.path_column == ACCESSION
        listing = dicomweb.search_instances(dicomweb.Source.parse(data_dir), dicomweb.Credentials.from_env(),
                                            accessions=by_accession)
        entries = listing.entries
        studies_of_accession = listing.studies_of_accession if by_accession else None
        log.info("DICOMweb: %d instances found", len(entries))
    elif not storage.is_dir(data_dir):
        raise PrepareError(f"data directory not found: {data_dir}")
    else:
        entries = list_entries(data_dir)
    scan = scan_labels(data_dir, cfg.labels, LabelColumns(cfg.path_column, cfg.label_column, cfg.patient_column,
                                                          cfg.site_column),
                       entries=entries, labels_format=cfg.labels_format, uncertain=cfg.uncertain,
                       metadata=cfg.metadata, mimic_patients=cfg.mimic_patients,
                       studies_of_accession=studies_of_accession)
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


def _archive_config(cfg: PrepareConfig) -> PrepareConfig:
    """A DICOMweb source: labels are required (an instance's UIDs are no class); its images are
    named by salted keys (the UIDs can identify a patient's study: :class:`PrepareConfig` sees to it),
    or STUDY/SERIES/SOP when the user asked (``--uid-names``)."""
    if not cfg.labels:
        raise PrepareError("a DICOMweb source needs --labels (for example --path-column SOPInstanceUID): an "
                           "archive has no folder per class")
    assert cfg.paths == "redact" or cfg.uid_names
    return cfg


@dataclass(frozen=True)
class _Job:
    """What every step of one prepare reads; nothing in it changes once made."""

    cfg: PrepareConfig
    t0: float
    data_dir: str
    layout: CacheLayout
    scan: LabelScan
    salt: str
    names: PathNames  # how the cache and its report name files (relative or redacted)
    views: frozenset[str]  # --views, upper-cased (empty: every view)


@dataclass
class _Rows:
    """The decoded rows of the labelled files, sorted out (each list of dicts by path)."""

    meta: list[dict]  # every labelled file's row (no pixels)
    ok: list[dict]  # the rows used
    quarantined: list[dict]  # {path, reason}: files that could not be used
    excluded: list[dict]  # {path, reason}: files left out by --views, listed in the report, never lost


def _prepare_into(cfg: PrepareConfig, t0: float, data_dir: str, cache: str, entries: list, scan: LabelScan,
                  salt: str) -> dict[str, Any]:
    """:func:`prepare`'s work on the cache, under its lock."""
    storage.makedirs(cache)
    job = _Job(cfg, t0, data_dir, CacheLayout(cache), scan, salt, PathNames(cfg.paths, salt),
               frozenset(v.strip().upper() for v in cfg.views))
    excluded = _excluded_by_labels(job)  # a view the labels give decides before decoding (a lateral is never decoded)
    left_out = {e["path"] for e in excluded}
    items = [(rel, lab) for rel, lab in scan.items if job.names.name(rel) not in left_out]
    rels = [rel for rel, _ in items]
    if cfg.path_map:
        missing = [m["path"] for m in scan.missing]
        where = dicomweb.location if dicomweb.is_source(data_dir) else storage.join
        write_path_map(cfg.path_map, [where(data_dir, e.rel) for e in entries] + missing,
                       [e.rel for e in entries] + missing, job.names)
    key, decoded = _decode(job, rels, {e.rel: (e.size, e.mtime_ns) for e in entries})
    labels = {job.names.name(rel): lab for rel, lab in items}  # by the name the cache's rows carry
    rows = _sort_rows(job, labels, excluded)
    _patients_from_labels(job, rows.ok)
    _attributes(job, rows.ok)
    multilabel = scan.multilabel or any(is_multilabel_label(labels[m["path"]]) for m in rows.ok)
    rel_of = {job.names.name(r): r for r in rels}
    split_of, split_source = _split(job, rows.ok, labels, multilabel, rel_of)
    manifest = pa.table({
        "path": [m["path"] for m in rows.ok],
        "split": [split_of[m["patient"]] for m in rows.ok],
        "label": [labels[m["path"]] for m in rows.ok],
        "patient": [m["patient"] for m in rows.ok],
        **{a: [m[a] for m in rows.ok] for a in subgroups.ATTRIBUTES},
    })
    storage.write_parquet(manifest, job.layout.manifest)
    fp = fingerprint.compute(manifest, cfg.preprocess.to_dict(), key)
    fingerprint.write(cache, fp)  # what runs and sweeps made from this cache pin
    split_fp = split_fingerprint([(rel_of[m["path"]], split_of[m["patient"]]) for m in rows.ok])
    return _report(job, rows, manifest, multilabel, split_source, decoded, fp, split_fp)


def _excluded_by_labels(job: _Job) -> list[dict]:
    """The labelled files whose view, as the labels give it, is not in ``--views``."""
    if not job.views:
        return []
    out = []
    for rel, _ in job.scan.items:
        v = job.scan.views.get(rel)
        if v and v not in job.views:
            out.append({"path": job.names.name(rel), "reason": f"view {v} (from the labels) not in --views "
                                                              f"{','.join(sorted(job.views))}"})
    return out


def _decode(job: _Job, rels: list[str], stats: dict[str, tuple[int, int]]) -> tuple[str, int | None]:
    """Decode ``rels`` into the cache's images, or reuse them when they were made from the same
    inputs and spec; then write the spec. Returns the images key and how many files this run
    decoded (None: all reused).

    An archive's instances are decoded per series (:func:`xray_dist.data.decode.archive_chunks`): a
    rerun after new studies arrived decodes only them, and instances the archive did not hand over
    are quarantined now and tried again by the next run (the cache is not marked complete)."""
    cfg, layout = job.cfg, job.layout
    key = _images_key(job.data_dir, rels, stats, cfg.preprocess, job.salt, cfg.paths)
    archive = dicomweb.is_source(job.data_dir)
    item_key = _images_key(dicomweb.Source.parse(job.data_dir).root, [], {}, cfg.preprocess, job.salt,
                           cfg.paths) if archive else None
    old = read_marker(layout.complete)
    if old is not None and old.get("key") == key:
        log.info("reusing decoded images in %s (same inputs and preprocessing)", layout.images)
        storage.write_json(layout.spec, cfg.preprocess.to_dict(), indent=2)
        return key, None
    earlier = []
    if old is not None:
        log.info("cache %s was made from other inputs or settings; decoding %s", layout.images,
                 "what is new" if archive else "again")
        earlier = recorded_chunks(layout.images)  # read while the marker still lists them
        storage.delete_file(layout.complete)  # no longer complete; its recorded chunks go in decode_all
    log.debug("decoding %d files with Ray tasks", len(rels))
    done = decode_all(cfg, rels, {r: stats[r][0] for r in rels}, layout, job.salt, key, job.names, earlier,
                      item_key)
    if done.retry:
        log.warning("%d chunk(s) hold instances the archive did not hand over: they are quarantined now; run "
                    "prepare again to retry them", len(done.retry))
    else:
        storage.write_json(layout.complete, {"key": key, "files": len(rels), "spec": cfg.preprocess.to_dict(),
                                             "chunks": done.chunks})
    storage.write_json(layout.spec, cfg.preprocess.to_dict(), indent=2)
    return key, done.decoded


def _sort_rows(job: _Job, labels: dict[str, str], excluded: list[dict]) -> _Rows:
    """Every labelled file's decoded row, sorted into used, quarantined (with the decoder's reason)
    and excluded (``excluded``, and by the header's View Position); refused when none is usable."""
    meta = read_image_meta(job.layout.root).to_pylist()
    seen = {m["path"] for m in meta}
    lost = sorted(set(labels) - seen)
    if lost:  # a decode task that lost rows must never pass silently
        raise CacheError(f"{len(lost)} files have no row in {job.layout.images} (e.g. {lost[0]}); delete the cache "
                         "and retry")
    meta = [m for m in meta if m["path"] in labels]
    excluded = excluded + _excluded_by_header(job, meta)
    left_out = {e["path"] for e in excluded}
    ok = sorted((m for m in meta if not m["error"] and m["path"] not in left_out), key=lambda m: m["path"])
    quarantined = sorted(({"path": m["path"], "reason": f"{m['error_kind']}: {m['error']}"}
                          for m in meta if m["error"]), key=lambda q: q["path"])
    if not ok:
        raise PrepareError(
            f"none of the {len(meta)} labelled files could be used; first reasons: "
            + "; ".join(f"{q['path']}: {q['reason']}" for q in (quarantined + excluded)[:3])
        )
    return _Rows(meta, ok, quarantined, excluded)


def _excluded_by_header(job: _Job, meta: list[dict]) -> list[dict]:
    """The decoded files whose view (the labels', else the DICOM header's) is not in ``--views``."""
    if not job.views:
        return []
    view_of = {job.names.name(rel): v for rel, v in job.scan.views.items()}
    out = []
    for m in meta:
        if m["error"]:
            continue
        v = view_of.get(m["path"]) or m.get("view") or ""
        if v not in job.views:
            why = (f"view {v} (from the DICOM header) not in --views {','.join(sorted(job.views))}" if v else
                   "no view: no View Position (0018,5101) in the header and none in the labels")
            out.append({"path": m["path"], "reason": why})
    return out


def _patients_from_labels(job: _Job, ok: list[dict]) -> None:
    """Where the labels name the patients (``--patient-column``, or the format's patient column),
    their key replaces the header's in the rows ``ok`` (changed in place)."""
    if not job.scan.patients:
        return
    patient_of = {job.names.name(rel): p for rel, p in job.scan.patients.items()}
    for m in ok:
        if patient_of.get(m["path"]):
            m["patient"], m["patient_source"] = labels_key(job.salt, patient_of[m["path"]]), BY_LABELS


def _attributes(job: _Job, ok: list[dict]) -> None:
    """Each used row's subgroup attributes (changed in place): the labels' over the header's, the
    view as ``--views`` read it, ``unknown`` where neither gives one (a cache decoded before
    attributes were read has none: all unknown)."""
    by_name = {job.names.name(rel): a for rel, a in job.scan.attributes.items()}
    view_of = {job.names.name(rel): v for rel, v in job.scan.views.items()}
    for m in ok:
        header = {a: m.get(a) or "" for a in subgroups.ATTRIBUTES}
        m.update(subgroups.merged(header, by_name.get(m["path"], {}), view_of.get(m["path"])))


def _split(job: _Job, ok: list[dict], labels: dict[str, str], multilabel: bool,
           rel_of: dict[str, str]) -> tuple[dict[str, str], dict]:
    """Patient → split (drawn, or from ``--split-file``), and how it was made (for the report)."""
    cfg = job.cfg
    stratum = _primary_finding(labels[m["path"]] for m in ok) if multilabel else (lambda lab: lab)
    strata = patient_labels([(m["patient"], stratum(labels[m["path"]])) for m in ok])
    # the patients' order before the seeded shuffle comes from their files, not their salted keys:
    # the same files and seed give the same split in any cache (names kept in memory only)
    order_names = canonical_names([(m["patient"], rel_of[m["path"]]) for m in ok])
    if cfg.split_files:  # official splits: fixed where the file says, drawn (train/val) for the rest
        return _official_splits(job, ok, strata, rel_of, order_names)
    return (split_patients(strata, cfg.val_fraction, cfg.test_fraction, cfg.seed, order_names),
            {"how": "drawn", "fixed_patients": 0, "drawn_patients": len(strata)})


def _counts(manifest: pa.Table, multilabel: bool) -> tuple[Counter, dict[str, dict[str, int]]]:
    """Images per class (per finding, and without any, for a multi-label cohort), and images and
    patients per split."""
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
    return classes, splits


def _warnings(cfg: PrepareConfig, ok: list[dict], classes: Counter, splits: dict) -> list[str]:
    """What the report warns about: one patient key holding many files, one class, no validation."""
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
    return warnings


def _report(job: _Job, rows: _Rows, manifest: pa.Table, multilabel: bool, split_source: dict,
            decoded_now: int | None, fp: dict, split_fp: str) -> dict[str, Any]:
    """The prepare report, written to ``CACHE/prepare_report.json`` (its warnings logged too)."""
    cfg, names, scan = job.cfg, job.names, job.scan
    classes, splits = _counts(manifest, multilabel)
    warnings = _warnings(cfg, rows.ok, classes, splits)
    decoded = {m["path"] for m in rows.meta}
    report = {
        "data_dir": names.location(job.data_dir),
        "labels": names.location(str(cfg.labels)) if cfg.labels else "folders",
        "paths": cfg.paths,
        "found": len(rows.meta) + len({e["path"] for e in rows.excluded} - decoded),
        "ok": len(rows.ok),
        "quarantined": rows.quarantined,
        "excluded": sorted(rows.excluded, key=lambda e: e["path"]),
        "labels_format": cfg.labels_format,
        "task": "multilabel" if multilabel else "multiclass",
        **({"uncertain": cfg.uncertain} if cfg.labels_format in ("chexpert", "mimic") else {}),
        **({"views": sorted(job.views)} if job.views else {}),
        "missing": [{"path": names.name(m["path"]), "reason": m["reason"]} for m in scan.missing],
        "unlabeled": [names.name(rel) for rel in scan.unlabeled],
        "classes": dict(sorted(classes.items())),
        "splits": splits,
        "subgroups": subgroups.counts(rows.ok),
        "patients_grouped_by": dict(sorted(Counter(m.get("patient_source") or "unknown" for m in rows.ok).items())),
        "image_size": cfg.preprocess.image_size,
        "preprocess": cfg.preprocess.to_dict(),
        "split_settings": {"val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction, "seed": cfg.seed,
                           **split_source},
        "cache_reused": decoded_now is None,
        "decoded_now": decoded_now or 0,  # files decoded by this run (the rest were decoded before)
        "fingerprint": fp["id"],
        "split_fingerprint": split_fp,
        "warnings": warnings,
        "seconds": round(time.time() - job.t0, 2),
    }
    assert report["found"] == report["ok"] + len(rows.quarantined) + len(rows.excluded)
    storage.write_json(job.layout.report, report, indent=2)
    for w in warnings:
        log.warning(w)
    return report


def _primary_finding(labels) -> "Callable[[str], str]":
    """Multi-label strata: an image's most frequent finding in the cohort (or the negative class),
    so the split keeps each finding's share without one stratum per label combination."""
    labels = list(labels)
    counts = finding_counts(labels, NEGATIVE)

    def stratum(label: str) -> str:
        present = parse_findings(label, NEGATIVE)[0]
        return min(present, key=lambda f: (-counts[f], f)) if present else label

    return stratum


def _official_splits(job: _Job, ok: list[dict], strata: dict[str, str], rel_of: dict[str, str],
                     order_names: dict[str, str]) -> tuple[dict[str, str], dict]:
    """Patient → split from ``--split-file``: fixed where it names a patient or a file of theirs
    (raw patient IDs are hashed as the cache's keys are), drawn (train/val, ``val_fraction``) for
    its ``train_val`` pool and for patients it does not name."""
    cfg = job.cfg
    sf = read_split_files(list(cfg.split_files))
    by_key = {k: split for raw, split in sf.by_patient.items() for k in keys_of_raw_id(job.salt, raw)}
    fixed = fixed_splits([{"path": m["path"], "rel": rel_of[m["path"]], "patient": m["patient"]} for m in ok], sf,
                         by_key)
    split_of = {p: s for p, s in fixed.items() if s != "train_val"}
    pool = {p: lab for p, lab in strata.items() if p not in split_of}
    split_of.update(split_patients(pool, cfg.val_fraction, 0.0, cfg.seed, order_names))
    return split_of, {"how": "split file", "split_files": [job.names.location(str(f)) for f in cfg.split_files],
                      "fixed_patients": len(strata) - len(pool), "drawn_patients": len(pool)}
