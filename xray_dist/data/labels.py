"""Label sources: a labels file in one of the public cohorts' formats, or a folder per class.

Whatever the source, the result is a :class:`LabelScan`: the labelled files to read (each with
its manifest label: one class, or findings joined by ``|``, :mod:`xray_dist.data.classes`), the
label rows that name no usable file (``missing``, with the reason), the files nobody labelled
(``unlabeled``), and — where the format has them — each file's patient and view. Nothing is
read from a path outside the data directory: a label row whose path escapes it, and a listed file
that is a symlink leading out of it (whatever the source, folders included), are listed in
``missing`` with the reason. A labels row holding a NUL byte or text that is not UTF-8 is listed
there too, by its line number, and the other rows are used.

Formats (``--labels-format``):

``csv``       a path (or a file name or stem) column and a label column; a label cell may hold
              several findings, ``Effusion|Infiltration`` (a multi-label task), ``?Edema`` marks an
              uncertain one; ``--patient-column`` names the patients.
``nih``       NIH ChestX-ray14 ``Data_Entry_2017.csv``: ``Image Index`` matches the DICOM file of the
              same stem (``00000001_000.png`` → ``…/00000001_000.dcm``), ``Finding Labels`` split on
              ``|`` with ``No Finding`` the negative, ``Patient ID`` the patient, ``View Position``.
``chexpert``  CheXpert's ``train.csv``/``valid.csv``: ``Path`` matched without its extension (and
              without leading folders the data directory does not have), one column per finding
              holding 1 / 0 / -1 (uncertain) / blank (not mentioned: absent, as in the CheXpert
              paper's labeller), ``Frontal/Lateral`` and ``AP/PA`` for the view, the patient from
              the path's ``patientNNNNN``.
``rsna``      RSNA Pneumonia ``stage_2_train_labels.csv``: a row per box, several per
              ``patientId`` (the DICOM file's stem); Target 1 → ``pneumonia``, 0 → ``normal``.
``mimic``     MIMIC-CXR-JPG's ``mimic-cxr-2.0.0-chexpert.csv`` (labels per ``subject_id``,
              ``study_id``, values as CheXpert's), joined to the DICOM files (stem = ``dicom_id``)
              through ``--metadata mimic-cxr-2.0.0-metadata.csv`` (``dicom_id``, ``study_id``,
              ``ViewPosition``); ``subject_id`` is the patient. Its official split CSV is read by
              ``--split-file``. Sex and age come from MIMIC-IV's ``patients.csv``
              (``--mimic-patients``: ``gender``, ``anchor_age`` moved to the metadata's
              ``StudyDate`` through ``anchor_year``); without it, from the DICOM headers.

Uncertain entries (-1) follow ``--uncertain``: ``ignore`` keeps them as uncertain (masked out of
that finding's loss and metrics for that image), ``zeros`` reads them as absent, ``ones`` as present.
"""

from __future__ import annotations

import dataclasses
import re

from xray_dist.config import LABELS_FORMATS
from xray_dist.data.classes import SEPARATOR, join_findings, parse_findings
from xray_dist.data.label_join import (OUTSIDE, Inside, LabelColumns, LabelRow, LabelScan, list_entries, read_csv,
                                       resolve)
from xray_dist.errors import PrepareError
from xray_dist.infra import storage

__all__ = ["FORMATS", "NEGATIVE", "OUTSIDE", "LabelColumns", "LabelRow", "LabelScan", "from_chexpert", "from_csv",
           "from_folders", "from_mimic", "from_nih", "from_rsna", "list_entries", "scan_labels"]

FORMATS = LABELS_FORMATS
#: The label the cohort formats give an image without findings.
NEGATIVE = "normal"
_CHEXPERT_NOT_FINDINGS = {"Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding"}
_MIMIC_NOT_FINDINGS = {"subject_id", "study_id", "No Finding"}


def _canonical(label: str) -> str:
    """A csv label cell: several findings sorted (and deduplicated) so one set is one label."""
    if SEPARATOR not in label and not label.startswith("?"):
        return label
    present, uncertain = parse_findings(label, negative="\0")
    return join_findings(present, uncertain)


def from_csv(data_dir, csv_path, columns: LabelColumns = LabelColumns(),
             entries: list[storage.FileEntry] | None = None,
             studies_of_accession: dict[str, list[str]] | None = None) -> LabelScan:
    """Labels from a CSV (``--labels-format csv``).

    ``columns.path`` holds a path relative to ``data_dir``, a file name or, RSNA style, a file stem
    (``0004cfab-...`` for ``stage_2_train_images/0004cfab-....dcm``); for a DICOMweb source a UID, or
    an Accession Number (``studies_of_accession``: the studies the archive's search gave each).
    """
    if columns.path == ACCESSION and studies_of_accession is None:
        raise PrepareError(f"--path-column {ACCESSION} joins labels to a DICOMweb source's studies (dicomweb+URL); "
                           "files are matched by their path")
    needed = [(columns.path, "set --path-column"), (columns.label, "set --label-column")]
    needed += [(columns.patient, "set --patient-column")] if columns.patient else []
    needed += [(columns.site, "set --site-column")] if columns.site else []
    _, rows, bad = read_csv(csv_path, "labels CSV", needed, ref=columns.path)
    label_rows = [LabelRow(ref=(r.get(columns.path) or "").strip(),
                           label=_canonical((r.get(columns.label) or "").strip()),
                           patient=(r.get(columns.patient) or "").strip() if columns.patient else "",
                           attributes={"site": r.get(columns.site) or ""} if columns.site else {}) for _, r in rows]
    entries = entries if entries is not None else list_entries(data_dir)
    if columns.path == ACCESSION:  # each row for each of its studies; an unknown one listed by its line, not its value
        label_rows = [dataclasses.replace(r, ref=study) for (line, _), r in zip(rows, label_rows)
                      for study in studies_of_accession.get(r.ref, [f"{ACCESSION} of line {line}"])]
    if columns.path in _BY_UID_LEVEL:
        label_rows = _per_instance(label_rows, entries, _BY_UID_LEVEL[columns.path])
    scan = resolve(data_dir, entries, label_rows, columns.label)
    scan.missing[:0] = bad
    scan.multilabel = any(SEPARATOR in lab or lab.startswith("?") for _, lab in scan.items)
    return scan


#: A DICOMweb source's instances are named ``STUDY/SERIES/SOP.dcm``: a label by Study or Series
#: Instance UID labels every instance under it (SOPInstanceUID matches the name's stem as it is).
_BY_UID_LEVEL = {"StudyInstanceUID": 0, "SeriesInstanceUID": 1, "AccessionNumber": 0}
ACCESSION = "AccessionNumber"


def _per_instance(rows: list[LabelRow], entries: list[storage.FileEntry], level: int) -> list[LabelRow]:
    """Each row of a study (series) as one row per instance the source holds under it; a row whose
    UID matches none stays as it is (and is listed: file not found)."""
    under: dict[str, list[str]] = {}
    for e in entries:
        parts = e.rel.split("/")
        if len(parts) == 3:
            under.setdefault(parts[level], []).append(e.rel)
    out = []
    for r in rows:
        names = under.get(r.ref)
        out += [dataclasses.replace(r, ref=n) for n in names] if names else [r]
    return out


def from_nih(data_dir, csv_path, entries: list[storage.FileEntry]) -> LabelScan:
    _, rows, bad = read_csv(csv_path, "NIH labels CSV (Data_Entry_2017.csv)",
                             [("Image Index", "NIH format"), ("Finding Labels", "NIH format")], ref="Image Index")
    out = []
    for _, r in rows:
        cell = (r.get("Finding Labels") or "").strip()
        findings = [f.strip() for f in cell.split("|") if f.strip() and f.strip() != "No Finding"]
        label = join_findings(findings, negative=NEGATIVE) if cell else ""
        out.append(LabelRow(ref=(r.get("Image Index") or "").strip(), label=label,
                            patient=(r.get("Patient ID") or "").strip(), view=(r.get("View Position") or "").strip(),
                            attributes={"sex": r.get("Patient Gender"), "age": r.get("Patient Age")}))
    scan = resolve(data_dir, entries, out, "Finding Labels")
    scan.missing[:0] = bad
    scan.multilabel = True
    return scan


def _finding_cells(row: dict, findings: list[str], uncertain: str) -> str:
    """CheXpert-style cells (1, 0, -1, blank) → a manifest label, the uncertain ones by policy."""
    present, unsure = [], []
    for f in findings:
        v = (row.get(f) or "").strip()
        try:
            x = float(v) if v else 0.0  # blank: not mentioned in the report, read as absent
        except ValueError:
            raise PrepareError(f"column {f!r} holds {v!r}; expected 1, 0, -1 or blank") from None
        if x == 1:
            present.append(f)
        elif x == -1:
            if uncertain == "ones":
                present.append(f)
            elif uncertain == "ignore":
                unsure.append(f)
        elif x != 0:
            raise PrepareError(f"column {f!r} holds {v!r}; expected 1, 0, -1 or blank")
    return join_findings(present, unsure, negative=NEGATIVE)


def from_chexpert(data_dir, csv_path, entries: list[storage.FileEntry], uncertain: str) -> LabelScan:
    cols, rows, bad = read_csv(csv_path, "CheXpert labels CSV", [("Path", "CheXpert format")], ref="Path")
    findings = [c for c in cols if c not in _CHEXPERT_NOT_FINDINGS]
    if not findings:
        raise PrepareError(f"{csv_path}: no finding columns besides {sorted(_CHEXPERT_NOT_FINDINGS & set(cols))}")
    out = []
    for i, r in rows:
        path = (r.get("Path") or "").strip()
        try:
            label = _finding_cells(r, findings, uncertain)
        except PrepareError as e:
            raise PrepareError(f"{csv_path}, line {i}: {e}") from None
        side = (r.get("Frontal/Lateral") or "").strip().lower()
        view = "LATERAL" if side == "lateral" else (r.get("AP/PA") or "").strip()
        m = re.search(r"(patient\d+)", path)
        out.append(LabelRow(ref=path, label=label, patient=m.group(1) if m else "", view=view,
                            attributes={"sex": r.get("Sex"), "age": r.get("Age")}))
    scan = resolve(data_dir, entries, out, "Path")
    scan.missing[:0] = bad
    scan.multilabel = True
    return scan


def from_rsna(data_dir, csv_path, entries: list[storage.FileEntry]) -> LabelScan:
    _, rows, bad = read_csv(csv_path, "RSNA labels CSV (stage_2_train_labels.csv)",
                             [("patientId", "RSNA format"), ("Target", "RSNA format")], ref="patientId")
    out = []
    for _, r in rows:
        pid, target = (r.get("patientId") or "").strip(), (r.get("Target") or "").strip()
        label = {"1": "pneumonia", "0": NEGATIVE}.get(target, "")
        out.append(LabelRow(ref=pid, label=label, patient=pid))
    scan = resolve(data_dir, entries, out, "Target")
    scan.missing[:0] = bad
    return scan


def _mimic_patients(path: str | None) -> dict[str, tuple[str, int | None, int | None]]:
    """MIMIC-IV's ``patients.csv``: ``subject_id`` → (gender, anchor_age, anchor_year); empty without one."""
    if not path:
        return {}
    _, rows, _ = read_csv(path, "MIMIC-IV patients CSV (--mimic-patients)",
                           [("subject_id", "MIMIC-IV patients.csv"), ("gender", "MIMIC-IV patients.csv"),
                            ("anchor_age", "MIMIC-IV patients.csv")], ref="subject_id")

    def number(v):
        try:
            return int(float(v))
        except (TypeError, ValueError):
            return None

    return {(r.get("subject_id") or "").strip(): ((r.get("gender") or "").strip(), number(r.get("anchor_age")),
                                                 number(r.get("anchor_year"))) for _, r in rows}


def _mimic_attributes(patient: tuple | None, study_date: str) -> dict:
    """Sex and age at the study: ``anchor_age`` is the age in ``anchor_year`` (MIMIC-IV's shifted
    calendar, which the metadata's ``StudyDate`` shares), so the study's age is anchor_age plus the
    years between them (anchor_age alone without a StudyDate)."""
    if patient is None:
        return {}
    gender, age, anchor_year = patient
    if age is not None and anchor_year is not None and study_date[:4].isdigit():
        age += int(study_date[:4]) - anchor_year
    return {"sex": gender, "age": "" if age is None else str(age)}


def from_mimic(data_dir, csv_path, metadata: str, entries: list[storage.FileEntry], uncertain: str,
               patients: str | None = None) -> LabelScan:
    cols, rows, bad = read_csv(csv_path, "MIMIC-CXR labels CSV (mimic-cxr-2.0.0-chexpert.csv)",
                                [("subject_id", "MIMIC format"), ("study_id", "MIMIC format")])
    findings = [c for c in cols if c not in _MIMIC_NOT_FINDINGS]
    label_of: dict[str, str] = {}
    for i, r in rows:
        try:
            label_of[(r.get("study_id") or "").strip()] = _finding_cells(r, findings, uncertain)
        except PrepareError as e:
            raise PrepareError(f"{csv_path}, line {i}: {e}") from None
    _, meta, bad_meta = read_csv(metadata, "MIMIC-CXR metadata CSV (--metadata)",
                                  [("dicom_id", "MIMIC metadata"), ("study_id", "MIMIC metadata")], ref="dicom_id")
    people = _mimic_patients(patients)
    out = []
    for _, r in meta:
        study, subject = (r.get("study_id") or "").strip(), (r.get("subject_id") or "").strip()
        out.append(LabelRow(ref=(r.get("dicom_id") or "").strip(), label=label_of.get(study, ""),
                            patient=subject, view=(r.get("ViewPosition") or "").strip(),
                            why=f"study {study}: no row in the labels CSV",
                            attributes=_mimic_attributes(people.get(subject), (r.get("StudyDate") or "").strip())))
    scan = resolve(data_dir, entries, out, "study_id")
    scan.missing[:0] = bad + bad_meta
    scan.multilabel = True
    return scan


def from_folders(data_dir, entries: list[storage.FileEntry] | None = None) -> LabelScan:
    """Labels from a folder-per-class layout, ``DATA/<class>/**/<file>``; top-level files are unlabeled.
    A file reached through a symlink leading out of ``data_dir`` is ``missing``, never read (the rule
    a labels CSV's paths follow)."""
    scan = LabelScan()
    inside = None if storage.is_uri(data_dir) else Inside(data_dir)
    for e in entries if entries is not None else list_entries(data_dir):
        rel = e.rel
        parts = rel.split("/")
        if len(parts) < 2:
            scan.unlabeled.append(rel)
        elif inside is not None and inside.leads_out(rel):
            scan.missing.append({"path": rel, "reason": OUTSIDE})
        else:
            scan.items.append((rel, parts[0]))
    return scan


def scan_labels(data_dir, labels_csv: str | None, columns: LabelColumns = LabelColumns(), *,
                entries: list[storage.FileEntry] | None = None, labels_format: str = "csv",
                uncertain: str = "ignore", metadata: str | None = None,
                mimic_patients: str | None = None,
                studies_of_accession: dict[str, list[str]] | None = None) -> LabelScan:
    """Labels for the files under ``data_dir`` (``entries``: its listing, when the caller has it;
    ``columns``: a csv file's columns; ``studies_of_accession``: a DICOMweb search's, for labels by
    Accession Number)."""
    patient_column = columns.patient
    if entries is None:
        if not storage.is_dir(data_dir):
            raise PrepareError(f"data directory not found: {data_dir}")
        entries = list_entries(data_dir)
    if patient_column and not labels_csv:
        raise PrepareError("--patient-column needs --labels: it names a column of the labels CSV")
    if patient_column and labels_format != "csv":
        raise PrepareError(f"--patient-column is for --labels-format csv; the {labels_format} format has its own "
                           "patient column")
    if labels_format == "nih":
        return from_nih(data_dir, labels_csv, entries)
    if labels_format == "chexpert":
        return from_chexpert(data_dir, labels_csv, entries, uncertain)
    if labels_format == "rsna":
        return from_rsna(data_dir, labels_csv, entries)
    if labels_format == "mimic":
        return from_mimic(data_dir, labels_csv, metadata, entries, uncertain, mimic_patients)
    if columns.site and (not labels_csv or labels_format != "csv"):
        raise PrepareError("--site-column is for --labels-format csv: it names a column of the labels CSV")
    if labels_csv:
        return from_csv(data_dir, labels_csv, columns, entries, studies_of_accession)
    return from_folders(data_dir, entries)
