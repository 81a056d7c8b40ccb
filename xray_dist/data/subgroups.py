"""Subgroup attributes: who and where an image comes from, for ``evaluate --by``.

None of them identifies a patient, and none is written as the header holds it where that could:

- ``sex``: (0010,0040) Patient's Sex — ``M``, ``F`` or ``O``;
- ``age``: a 10-year band (``0-9`` … ``80-89``, and ``90+`` as one band, as HIPAA's safe harbour
  asks) from (0010,1010) Patient's Age, else from the birth date against the study date —
  computed in memory, the dates never stored;
- ``view``: the labels' view, else (0018,5101) View Position;
- ``manufacturer`` and ``model``: (0008,0070) and (0008,1090);
- ``site``: the labels' ``--site-column``, else a salted key of (0008,0080) Institution Name (the
  name itself is never stored).

A value the file and the labels do not give is :data:`UNKNOWN`, never a reason to drop the image.
The labels' values, where a format carries them (NIH's Patient Gender and Age, CheXpert's Sex and
Age), win over the header's.
"""

from __future__ import annotations

import datetime as _dt
import re

from pydicom.dataset import Dataset

from xray_dist.data.cache import ATTRIBUTE_COLUMNS
from xray_dist.data.patients import hash_patient

#: The attributes, in the order reports show them.
ATTRIBUTES = ATTRIBUTE_COLUMNS
#: A value neither the file nor the labels give.
UNKNOWN = "unknown"
#: The prefix of a site's name in its salted key (a site never shares a key with a patient).
_SITE_PREFIX = "site:"
_SEX = {"M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F", "OTHER": "O"}
_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
_DAYS_PER = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}
#: Free text kept for manufacturer and model: printable, bounded (a header is not trusted).
_MAX_TEXT = 64


def sex(value) -> str:
    """``M``, ``F``, ``O`` from a header's or a labels file's value (``Male``, ``f``, ...), else unknown."""
    return _SEX.get(str(value or "").strip().upper(), UNKNOWN)


def age_band(years: float | None) -> str:
    """The 10-year band of an age in years (``90+`` from 90 on); unknown for None, a negative age
    or one past any human's (over 120: a data-entry error, such as NIH's few ages of 400+)."""
    if years is None or not 0 <= years <= 120:
        return UNKNOWN
    if years >= 90:
        return "90+"
    low = int(years) // 10 * 10
    return f"{low}-{low + 9}"


def age_years(value) -> float | None:
    """An age in years from a DICOM Age String (``045Y``, ``006M``, ``010W``, ``003D``) or a bare
    number of years (a labels file's column); None when it is neither."""
    m = _AGE.match(str(value or ""))
    if not m:
        return None
    unit = (m.group(2) or "Y").upper()
    return int(m.group(1)) * _DAYS_PER[unit] / 365.25


def _date(value) -> _dt.date | None:
    try:
        return _dt.datetime.strptime(str(value or "").strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _age_from_dates(ds: Dataset) -> float | None:
    born = _date(ds.get("PatientBirthDate", ""))
    seen = next((d for d in (_date(ds.get(k, "")) for k in ("StudyDate", "AcquisitionDate", "ContentDate")) if d),
                None)
    if born is None or seen is None or seen < born:
        return None
    return (seen - born).days / 365.25


def _text(value) -> str:
    text = " ".join(str(value or "").split())[:_MAX_TEXT]
    return text if text and text.isprintable() else UNKNOWN


def site_key(salt: str, name: str) -> str:
    """The salted key that stands for an institution's name."""
    return "site-" + hash_patient(salt, _SITE_PREFIX + name.strip())[:12]


def from_header(ds: Dataset, salt: str) -> dict[str, str]:
    """The attributes a file's header gives (``view`` upper-cased, empty when absent: the labels'
    view may still decide)."""
    years = age_years(ds.get("PatientAge", ""))
    institution = str(ds.get("InstitutionName", "") or "").strip()
    return {
        "sex": sex(ds.get("PatientSex", "")),
        "age": age_band(years if years is not None else _age_from_dates(ds)),
        "view": str(ds.get("ViewPosition", "") or "").strip().upper(),
        "manufacturer": _text(ds.get("Manufacturer", "")),
        "model": _text(ds.get("ManufacturerModelName", "")),
        "site": site_key(salt, institution) if institution else UNKNOWN,
    }


def from_labels(raw: dict[str, str]) -> dict[str, str]:
    """The attributes a labels row gives (``sex``, ``age`` in years, ``site`` as written: a site
    column names a hospital, not a patient), normalised; absent ones left out."""
    out = {}
    if raw.get("sex"):
        out["sex"] = sex(raw["sex"])
    if raw.get("age"):
        out["age"] = age_band(age_years(raw["age"]))
    if (raw.get("site") or "").strip():
        out["site"] = _text(raw["site"])
    return {k: v for k, v in out.items() if v != UNKNOWN}


def merged(header: dict, labels: dict, view: str | None) -> dict[str, str]:
    """One image's attributes: the labels' values over the header's, the view as prepare decided
    it; every attribute present (:data:`UNKNOWN` where nothing gave it)."""
    out = {a: (labels.get(a) or header.get(a) or UNKNOWN) for a in ATTRIBUTES}
    out["view"] = view or header.get("view") or UNKNOWN
    return out


def counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    """For the prepare report: each attribute's values and how many images have each."""
    out: dict[str, dict[str, int]] = {}
    for a in ATTRIBUTES:
        c: dict[str, int] = {}
        for r in rows:
            c[r[a]] = c.get(r[a], 0) + 1
        out[a] = dict(sorted(c.items()))
    return out
