"""Label sources: a CSV of paths (or RSNA-style file stems) and labels, or a folder per class.

Whatever the source, the result is a :class:`LabelScan`: the labelled files to read, the label
rows that name no usable file (``missing``, with the reason), and the files nobody labelled
(``unlabeled``). Nothing is read from a path outside the data directory.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from xray_dist import storage

from xray_dist.errors import PrepareError

# Files in the data directory that are never images and never reported as unlabeled.
_IGNORED_SUFFIXES = {".csv", ".json", ".txt", ".md", ".yaml", ".yml"}


@dataclass
class LabelScan:
    items: list[tuple[str, str]] = field(default_factory=list)  # (path relative to data dir, label)
    missing: list[dict[str, str]] = field(default_factory=list)  # {path, reason}
    unlabeled: list[str] = field(default_factory=list)  # relative paths
    patients: dict[str, str] = field(default_factory=dict)  # relative path -> patient (--patient-column)


def list_files(data_dir: str | Path) -> list[str]:
    """Every regular, non-hidden file under ``data_dir`` (local or URI; relative POSIX paths, sorted)."""
    return [e.rel for e in list_entries(data_dir)]


def list_entries(data_dir: str | Path) -> list[storage.FileEntry]:
    """:func:`list_files` with each file's size and modification time (one listing of the store)."""
    out = []
    for e in storage.list_files(data_dir):
        parts = e.rel.split("/")
        if any(part.startswith(".") for part in parts):
            continue
        if PurePosixPath(e.rel).suffix.lower() not in _IGNORED_SUFFIXES:
            out.append(e)
    return out


def from_csv(data_dir: str | Path, csv_path: str | Path, path_column: str = "path", label_column: str = "label",
             entries: list[storage.FileEntry] | None = None, patient_column: str | None = None) -> LabelScan:
    """Labels from a CSV.

    ``path_column`` holds a path relative to ``data_dir`` or, RSNA style, a file stem
    (``0004cfab-...`` for ``stage_2_train_images/0004cfab-....dcm``), looked up among the files
    under ``data_dir``. Repeated rows for one file (RSNA has one per box) are merged when they
    agree and reported as ``missing`` when their labels conflict.
    """
    try:
        text = storage.read_text(csv_path)
    except (FileNotFoundError, IsADirectoryError):
        raise PrepareError(f"labels CSV not found: {csv_path}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    cols = reader.fieldnames or []
    wanted = [(path_column, "--path-column"), (label_column, "--label-column")]
    for col, flag in wanted + ([(patient_column, "--patient-column")] if patient_column else []):
        if col not in cols:
            raise PrepareError(f"{csv_path}: no column {col!r} (set {flag}); columns are {cols}")
    rows = list(reader)

    all_files = [e.rel for e in (entries if entries is not None else list_entries(data_dir))]
    listed = set(all_files)
    by_stem: dict[str, list[str]] = {}
    for rel in all_files:
        by_stem.setdefault(PurePosixPath(rel).stem, []).append(rel)
    local = not storage.is_uri(data_dir)

    scan = LabelScan()
    chosen: dict[str, str] = {}
    conflicts: set[str] = set()
    for row in rows:
        value = (row.get(path_column) or "").strip()
        label = (row.get(label_column) or "").strip()
        if not value:
            scan.missing.append({"path": value, "reason": f"empty {path_column!r} cell"})
            continue
        found = storage.inside(data_dir, value)
        if found is None:
            scan.missing.append({"path": value, "reason": "path escapes the data directory; not read"})
            continue
        # a listed file, or (locally) any file the path reaches, hidden or not, as before
        if found in listed or (local and storage.is_file(storage.join(data_dir, found))):
            rel = found
        elif value in by_stem and len(by_stem[value]) == 1:
            rel = by_stem[value][0]
        elif value in by_stem:
            scan.missing.append({"path": value, "reason": f"file stem matches {len(by_stem[value])} files"})
            continue
        else:
            scan.missing.append({"path": value, "reason": "file not found"})
            continue
        if not label:
            scan.missing.append({"path": rel, "reason": f"empty {label_column!r} cell"})
            continue
        if rel in chosen and chosen[rel] != label:
            conflicts.add(rel)
        chosen.setdefault(rel, label)
        if patient_column and (row.get(patient_column) or "").strip():
            scan.patients.setdefault(rel, row[patient_column].strip())
    for rel in sorted(conflicts):
        scan.missing.append({"path": rel, "reason": "conflicting labels in the CSV; not used"})
        del chosen[rel]
    scan.items = sorted(chosen.items())
    labelled = set(chosen) | conflicts
    scan.unlabeled = [rel for rel in all_files if rel not in labelled]
    return scan


def from_folders(data_dir: str | Path, entries: list[storage.FileEntry] | None = None) -> LabelScan:
    """Labels from a folder-per-class layout, ``DATA/<class>/**/<file>``; top-level files are unlabeled."""
    scan = LabelScan()
    for e in entries if entries is not None else list_entries(data_dir):
        rel = e.rel
        parts = rel.split("/")
        if len(parts) < 2:
            scan.unlabeled.append(rel)
        else:
            scan.items.append((rel, parts[0]))
    return scan


def scan_labels(data_dir: str | Path, labels_csv: str | None, path_column: str, label_column: str,
                entries: list[storage.FileEntry] | None = None, patient_column: str | None = None) -> LabelScan:
    """Labels for the files under ``data_dir`` (``entries``: its listing, when the caller has it)."""
    if entries is None:
        if not storage.is_dir(data_dir):
            raise PrepareError(f"data directory not found: {data_dir}")
        entries = list_entries(data_dir)
    if patient_column and not labels_csv:
        raise PrepareError("--patient-column needs --labels: it names a column of the labels CSV")
    if labels_csv:
        return from_csv(data_dir, labels_csv, path_column, label_column, entries, patient_column)
    return from_folders(data_dir, entries)
