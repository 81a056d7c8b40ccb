"""Patient keys: the salted hash that stands for a patient in the cache, its manifest and its splits.

A key is ``sha256(salt + NUL + kind:identifier)`` cut to 20 hex digits, where the identifier is
(0010,0020) *Patient ID*, else (0020,000D) *Study Instance UID*, else the file itself (it is its
own patient), or the patient a labels file names (which then wins over the header). The raw
identifier never leaves this module; what made a key (:data:`BY_PATIENT_ID`, ...) is reported,
never the identifier. The salt is :mod:`xray_dist.data.salt`'s.
"""

from __future__ import annotations

import hashlib

from pydicom.dataset import Dataset

#: What a patient key was made from (reported by ``prepare``; never the identifier itself).
BY_PATIENT_ID, BY_STUDY_UID, BY_FILE, BY_LABELS = "patient_id", "study_uid", "file", "labels"

#: The prefix of each kind of identifier in the hashed text (so a Patient ID and a Study UID that
#: happen to be equal never give the same key).
_PREFIX = {BY_PATIENT_ID: "pid:", BY_STUDY_UID: "study:", BY_FILE: "file:", BY_LABELS: "labels:"}


def hash_patient(salt: str, source: str) -> str:
    """The salted patient key of an identifier (``pid:…``, ``study:…``, ``file:…``, ``labels:…``)."""
    return hashlib.sha256((salt + "\x00" + source).encode()).hexdigest()[:20]


def patient_key(ds: Dataset, salt: str, fallback: str) -> str:
    """Salted SHA-256 of (0010,0020) Patient ID; (0020,000D) Study Instance UID when it is empty.

    When both are empty the file is its own patient (``fallback`` is hashed instead). The raw
    identifier never leaves this function.
    """
    return patient_key_and_source(ds, salt, fallback)[0]


def patient_key_and_source(ds: Dataset, salt: str, fallback: str) -> tuple[str, str]:
    """:func:`patient_key` and which of :data:`BY_PATIENT_ID`, :data:`BY_STUDY_UID`, :data:`BY_FILE` made it."""
    pid = str(ds.get("PatientID", "") or "").strip()
    if pid:
        return hash_patient(salt, _PREFIX[BY_PATIENT_ID] + pid), BY_PATIENT_ID
    study = str(ds.get("StudyInstanceUID", "") or "").strip()
    if study:
        return hash_patient(salt, _PREFIX[BY_STUDY_UID] + study), BY_STUDY_UID
    return hash_patient(salt, _PREFIX[BY_FILE] + fallback), BY_FILE


def labels_key(salt: str, patient: str) -> str:
    """The key of a patient named by the labels (``--patient-column``, or the format's own column)."""
    return hash_patient(salt, _PREFIX[BY_LABELS] + patient)


def keys_of_raw_id(salt: str, raw: str) -> list[str]:
    """Every key a raw identifier from a split file may have become: as a Patient ID, as the labels'
    patient, or as a Study Instance UID."""
    return [hash_patient(salt, _PREFIX[by] + raw) for by in (BY_PATIENT_ID, BY_LABELS, BY_STUDY_UID)]
