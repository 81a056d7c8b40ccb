"""Patient-level, label-stratified, seeded splits — or the official ones of ``--split-file`` —
with no patient ever on two sides."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np

from xray_dist.infra import storage
from xray_dist.errors import PrepareError


def patient_labels(rows: list[tuple[str, str]]) -> dict[str, str]:
    """``(patient, label)`` per image → one stratum per patient: their most frequent label
    (ties broken alphabetically, so the result does not depend on row order)."""
    counts: dict[str, Counter] = {}
    for patient, label in rows:
        counts.setdefault(patient, Counter())[label] += 1
    return {p: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for p, c in counts.items()}


def split_patients(strata: dict[str, str], val_fraction: float, test_fraction: float, seed: int,
                   names: dict[str, str] | None = None) -> dict[str, str]:
    """Assign each patient to ``train``, ``val`` or ``test``.

    Within each label, patients are put in a canonical order, shuffled with ``seed`` and cut by the
    fractions (rounded, and at least one validation patient per label that has two or more patients
    when ``val_fraction > 0``), so every split sees every class in proportion.

    The canonical order is by ``names`` (patient key → a name that does not depend on the salt:
    prepare passes the relative path of the patient's first file), so the split is a function of
    the files, the labels, the fractions and ``seed`` alone — not of the salt that made the keys,
    the machine, the cache's location or the order files were listed in. Without ``names`` the
    keys themselves are sorted (the same keys and seed still give the same split).
    """
    rng = np.random.default_rng(seed)
    name = (names or {}).get
    out: dict[str, str] = {}
    for label in sorted(set(strata.values())):
        members = sorted((p for p, lab in strata.items() if lab == label), key=lambda p: (name(p) or "", p))
        order = [members[i] for i in rng.permutation(len(members))]
        n = len(order)
        n_val = int(round(n * val_fraction))
        n_test = int(round(n * test_fraction))
        if val_fraction > 0 and n >= 2:
            n_val = max(n_val, 1)
        if test_fraction > 0 and n >= 3:
            n_test = max(n_test, 1)
        n_val = min(n_val, max(n - 1, 0))
        n_test = min(n_test, max(n - 1 - n_val, 0))
        for i, p in enumerate(order):
            out[p] = "val" if i < n_val else ("test" if i < n_val + n_test else "train")
    return out


def canonical_names(patient_files: list[tuple[str, str]]) -> dict[str, str]:
    """``(patient key, relative path)`` per image → each patient's first relative path: a name for
    the patient that two caches of the same files share whatever their salts (kept in memory only)."""
    out: dict[str, str] = {}
    for patient, rel in patient_files:
        if patient not in out or rel < out[patient]:
            out[patient] = rel
    return out


def split_fingerprint(rel_splits: list[tuple[str, str]]) -> str:
    """A salt-free fingerprint of a split: a hash over every image's relative path and split, so
    two people can compare their splits without comparing manifests (the same files, labels,
    settings and seed give the same value on any machine)."""
    h = hashlib.sha256()
    for rel, split in sorted(rel_splits):
        h.update(json.dumps([rel, split]).encode() + b"\n")
    return h.hexdigest()[:20]


# ---- official splits ----------------------------------------------------------------------------------

SPLITS = ("train", "val", "test", "train_val")
#: Split names of the public cohorts' split files (MIMIC-CXR says ``validate``).
_SPLIT_NAMES = {"validate": "val", "valid": "val", "validation": "val"}
#: Columns naming a file (MIMIC-CXR's split CSV: ``dicom_id``, the file's stem) or a patient.
_FILE_COLUMNS = ("path", "dicom_id")
_PATIENT_COLUMNS = ("patient", "subject_id")


@dataclass
class SplitFile:
    """Fixed assignments read from ``--split-file``: by file (relative path, file name or stem) and
    by patient (the raw identifier, as in the DICOM Patient ID or the labels' patient column).
    ``train_val`` is the pool from which validation patients are drawn."""

    by_file: dict[str, str] = field(default_factory=dict)
    by_patient: dict[str, str] = field(default_factory=dict)

    def of_file(self, rel: str) -> str | None:
        """The split of the file at ``rel``: listed by that path, its file name, or its stem under
        any extension (NIH lists ``00000001_000.png`` for the DICOM ``00000001_000.dcm``)."""
        p = PurePosixPath(rel)
        for k in (rel, p.name):
            if k in self.by_file:
                return self.by_file[k]
        if not hasattr(self, "_stems"):
            self._stems = {PurePosixPath(k).stem: v for k, v in self.by_file.items()}
        return self._stems.get(p.stem)


def _split_of_list(path: str) -> str:
    name = PurePosixPath(path).name.lower()
    for marker, split in (("train_val", "train_val"), ("trainval", "train_val"), ("test", "test"), ("val", "val"),
                          ("train", "train")):
        if marker in name:
            return split
    raise PrepareError(f"--split-file {path}: a plain list must say its split in its name (test_list.txt, "
                       "train_val_list.txt, val_list.txt, train_list.txt); or give a CSV with a split column")


def read_split_files(paths: list[str]) -> SplitFile:
    """``--split-file`` arguments: CSVs of ``path`` or ``patient`` plus ``split``, or plain lists of
    file names (``test_list.txt``, ``train_val_list.txt``: the split from the file's name). A file
    or patient given two different splits is an error."""
    out = SplitFile()

    def put(table: dict, key: str, split: str, where: str) -> None:
        if split not in SPLITS:
            raise PrepareError(f"--split-file {where}: split {split!r} for {key!r}; expected one of "
                               f"{', '.join(SPLITS)}")
        if table.setdefault(key, split) != split:
            raise PrepareError(f"--split-file {where}: {key!r} is given two splits ({table[key]} and {split})")

    for path in paths:
        try:
            text = storage.read_text(path)
        except (FileNotFoundError, IsADirectoryError):
            raise PrepareError(f"--split-file {path}: no such file") from None
        if PurePosixPath(path).suffix.lower() == ".csv":
            reader = csv.DictReader(io.StringIO(text, newline=""))
            cols = set(reader.fieldnames or [])
            if "split" not in cols or not cols & {*_FILE_COLUMNS, *_PATIENT_COLUMNS}:
                raise PrepareError(f"--split-file {path}: expected a 'split' column and a 'path' (or MIMIC's "
                                   f"'dicom_id') or 'patient' (or 'subject_id') column; found {sorted(cols)}")
            for row in reader:
                split = (row.get("split") or "").strip().lower()
                split = _SPLIT_NAMES.get(split, split)
                for table, columns in ((out.by_file, _FILE_COLUMNS), (out.by_patient, _PATIENT_COLUMNS)):
                    key = next(((row.get(c) or "").strip() for c in columns if (row.get(c) or "").strip()), "")
                    if key:
                        put(table, key, split, path)
        else:
            split = _split_of_list(path)
            for line in text.splitlines():
                if line.strip():
                    put(out.by_file, line.strip(), split, path)
    return out


def fixed_splits(images: list[dict], split_file: SplitFile, patient_split: dict[str, str]) -> dict[str, str]:
    """Patient key → split from the split file, for the ``images`` (``path``: the name outputs use,
    ``rel``, ``patient``) it names; ``patient_split`` maps hashed patient keys to the file's
    patient rows. A patient given two splits (``train_val`` goes with ``train`` or ``val``, not
    with ``test``) is an error naming the patient's files."""
    seen: dict[str, dict[str, str]] = {}
    for m in images:
        split = split_file.of_file(m["rel"]) or patient_split.get(m["patient"])
        if split:
            seen.setdefault(m["patient"], {})[m["path"]] = split
    out = {}
    for patient, files in seen.items():
        kinds = set(files.values())
        if len(kinds) > 1 and not (kinds <= {"train", "train_val"} or kinds <= {"val", "train_val"}):
            listed = "; ".join(f"{p}: {s}" for p, s in sorted(files.items()))
            raise PrepareError(f"--split-file puts one patient (key {patient[:12]}) in two splits: {listed}. "
                               "A patient's images must all be on one side")
        out[patient] = sorted(kinds - {"train_val"})[0] if kinds - {"train_val"} else "train_val"
    return out
