"""A labels file's rows joined to the DICOM files under the data directory: what every format shares.

- :func:`read_csv` reads a labels file that may be hostile (a NUL byte, text that is not UTF-8, a
  missing column): a bad row is listed with its line and fault, never its contents, and the rest
  are used;
- :func:`resolve` matches each row's reference (a path, a file name or a stem) to one file, never
  jumping to another patient's file, and never following a symlink out of the data directory;
- :class:`LabelScan` is the result every format returns: labelled files, and every row or file
  not used, with its reason.

The formats themselves (csv, nih, chexpert, rsna, mimic) are :mod:`xray_dist.data.labels`.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from xray_dist.data import subgroups
from xray_dist.errors import PrepareError
from xray_dist.infra import storage

# Files in the data directory that are never images and never reported as unlabeled.
_IGNORED_SUFFIXES = {".csv", ".json", ".txt", ".md", ".yaml", ".yml"}


@dataclass
class LabelScan:
    items: list[tuple[str, str]] = field(default_factory=list)  # (path relative to data dir, label)
    missing: list[dict[str, str]] = field(default_factory=list)  # {path, reason}
    unlabeled: list[str] = field(default_factory=list)  # relative paths
    patients: dict[str, str] = field(default_factory=dict)  # relative path -> patient (from the labels)
    views: dict[str, str] = field(default_factory=dict)  # relative path -> view (from the labels)
    attributes: dict[str, dict] = field(default_factory=dict)  # relative path -> subgroup attributes (the labels')
    multilabel: bool = False  # the format's labels are findings


@dataclass(frozen=True)
class LabelColumns:
    """The columns of a ``--labels-format csv`` file: the file, its label, and optionally its
    patient (``--patient-column``) and its site (``--site-column``, a subgroup attribute)."""

    path: str = "path"
    label: str = "label"
    patient: str | None = None
    site: str | None = None


@dataclass
class LabelRow:
    """One row of a labels file: ``ref`` names a file (path, file name or stem)."""

    ref: str
    label: str
    patient: str = ""
    view: str = ""
    why: str = ""  # why ``label`` is empty, when the format knows
    attributes: dict = field(default_factory=dict)  # sex, age (years), site, as the file writes them


def list_entries(data_dir) -> list[storage.FileEntry]:
    """Every regular, non-hidden file under ``data_dir`` that may be an image (local or URI; paths
    relative to it, POSIX, sorted), with its size and modification time (one listing of the store)."""
    out = []
    for e in storage.list_files(data_dir):
        parts = e.rel.split("/")
        if any(part.startswith(".") for part in parts):
            continue
        if PurePosixPath(e.rel).suffix.lower() not in _IGNORED_SUFFIXES:
            out.append(e)
    return out


#: Text that is not UTF-8, as decoded with ``surrogateescape`` (one lone surrogate per undecodable byte).
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def _row_fault(row: dict) -> str | None:
    """Why a CSV row's cells cannot be trusted (None: they can): a NUL byte, or bytes that are not
    UTF-8. Either would reach a path or a label as garbage (``embedded null byte`` from the OS)."""
    for v in row.values():
        for cell in (v if isinstance(v, list) else [v]):
            if not cell:
                continue
            if "\0" in cell:
                return "a NUL byte in a cell"
            bad = _UNDECODABLE.search(cell)
            if bad:
                return f"a cell that is not UTF-8 text (byte 0x{ord(bad.group()) - 0xDC00:02x})"
    return None


def _printable(cell: str) -> str:
    """A cell as a report can name it: NUL and undecodable bytes written as escapes (``\\x00``)."""
    return cell.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").replace("\0", "\\x00")


def read_csv(path, what: str, needed: list[tuple[str, str]],
              ref: str | None = None) -> tuple[list[str], list[tuple[int, dict]], list[dict]]:
    """Columns, rows (each with the line it ends on) and bad rows of a CSV.

    A missing file or column is a :class:`PrepareError` naming it. A row holding a NUL byte or text
    that is not UTF-8 is one bad row, not a failed file: it comes back in the third list as a
    ``missing`` entry (``path``: its ``ref`` cell — the file it names — escaped; ``reason``: its line
    number and fault, never its contents) and the other rows are used.
    """
    try:
        data = storage.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError):
        raise PrepareError(f"{what} not found: {path}") from None
    reader = csv.DictReader(io.StringIO(data.decode("utf-8", "surrogateescape").lstrip("\ufeff"), newline=""))
    cols = reader.fieldnames or []
    for col, hint in needed:
        if col not in cols:
            raise PrepareError(f"{path}: no column {col!r} ({hint}); columns are {cols}")
    rows, bad = [], []
    for row in reader:
        fault = _row_fault(row)
        if fault:
            cell = row.get(ref) if ref else ""
            bad.append({"path": _printable((cell if isinstance(cell, str) else "").strip()),
                        "reason": f"line {reader.line_num} of the {what}: {fault}; row not used"})
        else:
            rows.append((reader.line_num, row))
    return cols, rows, bad


class _Files:
    """The data directory's files, found by a label row's reference: the relative path itself; the
    path without its extension, with leading folders dropped one by one (CheXpert's
    ``CheXpert-v1.0-small/train/…/view1_frontal.jpg`` for ``train/…/view1_frontal.dcm``); or a
    unique stem (NIH's ``00000001_000.png``, RSNA's ``patientId``, MIMIC's ``dicom_id``)."""

    def __init__(self, data_dir, entries: list[storage.FileEntry]):
        self.data_dir = data_dir
        self.all = [e.rel for e in entries]
        self.listed = set(self.all)
        self.by_base: dict[str, list[str]] = {}
        self.by_stem: dict[str, list[str]] = {}
        for rel in self.all:
            p = PurePosixPath(rel)
            self.by_base.setdefault(str(p.with_suffix("")), []).append(rel)
            self.by_stem.setdefault(p.stem, []).append(rel)
        self.local = not storage.is_uri(data_dir)
        self.tops = {rel.split("/", 1)[0] for rel in self.all}
        self._inside = Inside(data_dir) if self.local else None

    def find(self, value: str) -> tuple[str | None, str]:
        """``(relative path, "")`` or ``(None, reason)``."""
        found = storage.inside(self.data_dir, value)
        if found is None:
            return None, "path escapes the data directory; not read"
        # a listed file, or (locally) any file the path reaches, hidden or not, as before
        if found in self.listed or (self.local and storage.is_file(storage.join(self.data_dir, found))):
            return found, ""
        if "/" not in found and len(self.by_stem.get(found, [])) == 1:  # a stem with dots: a UID (1.2.840…)
            return self.by_stem[found][0], ""
        parts = PurePosixPath(found).with_suffix("").parts
        for i in range(len(parts) - 1):  # leading folders the data directory lacks are dropped, no more
            hits = self.by_base.get("/".join(parts[i:]), [])
            if len(hits) == 1:
                return hits[0], ""
            if parts[i] in self.tops:
                break
        if len(parts) > 1:
            return None, "file not found"
        hits = self.by_stem.get(parts[0], [])
        if len(hits) == 1:
            return hits[0], ""
        if hits:
            return None, f"file stem matches {len(hits)} files"
        return None, "file not found"

    def leads_out(self, rel: str) -> bool:
        """Whether the file at ``rel`` (as listed) is reached through a symlink leading out of the
        data directory (:class:`Inside`)."""
        return self._inside.leads_out(rel) if self._inside is not None else False


#: Why a file reached through a symlink leading out of the data directory is not read.
OUTSIDE = "symlink leading outside the data directory; not read"


class Inside:
    """For a local data directory: whether a listed file is reached through a symlink leading out
    of it (:func:`storage.inside`, the rule a label row's path follows), asked once per folder and,
    for the file itself, only when it is a link."""

    def __init__(self, data_dir):
        self.data_dir, self.root = data_dir, storage.absolute(data_dir)
        self.folders: dict[str, bool] = {}

    def leads_out(self, rel: str) -> bool:
        folder = rel.rpartition("/")[0]
        if folder not in self.folders:
            self.folders[folder] = storage.inside(self.data_dir, folder or ".") is None
        if self.folders[folder]:
            return True
        return os.path.islink(os.path.join(self.root, rel)) and storage.inside(self.data_dir, rel) is None


def resolve(data_dir, entries: list[storage.FileEntry], rows: list[LabelRow], label_name: str) -> LabelScan:
    """Label rows → a :class:`LabelScan`. Repeated rows for one file (RSNA has one per box) are
    merged when they agree and reported as ``missing`` when their labels conflict."""
    files = _Files(data_dir, entries)
    scan = LabelScan()
    chosen: dict[str, str] = {}
    conflicts: set[str] = set()
    refused: set[str] = set()
    for row in rows:
        if not row.ref:
            scan.missing.append({"path": row.ref, "reason": "empty file cell"})
            continue
        rel, why = files.find(row.ref)
        if rel is None:
            scan.missing.append({"path": row.ref, "reason": why})
            continue
        if files.leads_out(rel):  # found by its name or stem: the same rule as for a path given whole
            if rel not in refused:
                scan.missing.append({"path": rel, "reason": OUTSIDE})
            refused.add(rel)
            continue
        if not row.label:
            scan.missing.append({"path": rel, "reason": row.why or f"empty {label_name!r} cell"})
            continue
        if rel in chosen and chosen[rel] != row.label:
            conflicts.add(rel)
        chosen.setdefault(rel, row.label)
        if row.patient:
            scan.patients.setdefault(rel, row.patient)
        if row.view:
            scan.views.setdefault(rel, row.view.strip().upper())
        if row.attributes and subgroups.from_labels(row.attributes):
            scan.attributes.setdefault(rel, subgroups.from_labels(row.attributes))
    for rel in sorted(conflicts):
        scan.missing.append({"path": rel, "reason": "conflicting labels in the CSV; not used"})
        del chosen[rel]
    scan.items = sorted(chosen.items())
    labelled = set(chosen) | conflicts | refused
    scan.unlabeled = [rel for rel in files.all if rel not in labelled]
    return scan
