"""Label sources: a CSV of paths (or RSNA-style file stems) and labels, or a folder per class.

Whatever the source, the result is a :class:`LabelScan`: the labelled files to read, the label
rows that name no usable file (``missing``, with the reason), and the files nobody labelled
(``unlabeled``). Nothing is read from a path outside the data directory.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from xray_dist.errors import PrepareError

# Files in the data directory that are never images and never reported as unlabeled.
_IGNORED_SUFFIXES = {".csv", ".json", ".txt", ".md", ".yaml", ".yml"}


@dataclass
class LabelScan:
    items: list[tuple[str, str]] = field(default_factory=list)  # (path relative to data dir, label)
    missing: list[dict[str, str]] = field(default_factory=list)  # {path, reason}
    unlabeled: list[str] = field(default_factory=list)  # relative paths


def list_files(data_dir: Path) -> list[str]:
    """Every regular, non-hidden file under ``data_dir`` (relative POSIX paths, sorted)."""
    out = []
    for p in sorted(data_dir.rglob("*")):
        rel = p.relative_to(data_dir)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and p.suffix.lower() not in _IGNORED_SUFFIXES:
            out.append(rel.as_posix())
    return out


def _inside(data_dir: Path, value: str) -> Path | None:
    """The resolved path if ``value`` stays inside ``data_dir`` (symlinks resolved), else None."""
    root = data_dir.resolve()
    cand = (root / value).resolve()
    try:
        cand.relative_to(root)
    except ValueError:
        return None
    return cand


def from_csv(data_dir: Path, csv_path: Path, path_column: str = "path", label_column: str = "label") -> LabelScan:
    """Labels from a CSV.

    ``path_column`` holds a path relative to ``data_dir`` or, RSNA style, a file stem
    (``0004cfab-...`` for ``stage_2_train_images/0004cfab-....dcm``), looked up among the files
    under ``data_dir``. Repeated rows for one file (RSNA has one per box) are merged when they
    agree and reported as ``missing`` when their labels conflict.
    """
    if not csv_path.is_file():
        raise PrepareError(f"labels CSV not found: {csv_path}")
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        for col, flag in ((path_column, "--path-column"), (label_column, "--label-column")):
            if col not in cols:
                raise PrepareError(f"{csv_path}: no column {col!r} (set {flag}); columns are {cols}")
        rows = list(reader)

    all_files = list_files(data_dir)
    by_stem: dict[str, list[str]] = {}
    for rel in all_files:
        by_stem.setdefault(Path(rel).stem, []).append(rel)
    root = data_dir.resolve()

    scan = LabelScan()
    chosen: dict[str, str] = {}
    conflicts: set[str] = set()
    for row in rows:
        value = (row.get(path_column) or "").strip()
        label = (row.get(label_column) or "").strip()
        if not value:
            scan.missing.append({"path": value, "reason": f"empty {path_column!r} cell"})
            continue
        cand = _inside(data_dir, value)
        if cand is None:
            scan.missing.append({"path": value, "reason": "path escapes the data directory; not read"})
            continue
        if cand.is_file():
            rel = cand.relative_to(root).as_posix()
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
    for rel in sorted(conflicts):
        scan.missing.append({"path": rel, "reason": "conflicting labels in the CSV; not used"})
        del chosen[rel]
    scan.items = sorted(chosen.items())
    labelled = set(chosen) | conflicts
    scan.unlabeled = [rel for rel in all_files if rel not in labelled]
    return scan


def from_folders(data_dir: Path) -> LabelScan:
    """Labels from a folder-per-class layout, ``DATA/<class>/**/<file>``; top-level files are unlabeled."""
    scan = LabelScan()
    for rel in list_files(data_dir):
        parts = Path(rel).parts
        if len(parts) < 2:
            scan.unlabeled.append(rel)
        else:
            scan.items.append((rel, parts[0]))
    return scan


def scan_labels(data_dir: str | Path, labels_csv: str | None, path_column: str, label_column: str) -> LabelScan:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise PrepareError(f"data directory not found: {data_dir}")
    if labels_csv:
        return from_csv(data_dir, Path(labels_csv), path_column, label_column)
    return from_folders(data_dir)
