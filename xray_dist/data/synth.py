"""Synthetic chest-like radiographs written as real DICOM files, with a learnable finding per class.

Each patient gets one class; each of their images shows that class's finding (a dense round
opacity at a class-specific place in the lungs; the first class, conventionally ``normal``, has
none). Each class's files rotate through the encodings the reader must get right, so every test
and the demo exercise MONOCHROME1/2, 8- and 16-bit, signed values with rescale, windowing, big
endian, RLE and JPEG 2000 (lossless and lossy) — and the rotation is per class, so with 8 images or
more per class every class has every encoding and no class can be told apart by how its files are
encoded (a decode bug then makes the task harder, never easier). Patient names, IDs and birth
dates are filled in on purpose so that tests can prove none of them leaks into anything xray-dist
writes. :func:`write_image` writes one file as a :class:`Radiograph` describes it (tests build the
public cohorts' layouts from it).
"""

from __future__ import annotations

import csv
import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")

#: The encodings synth rotates through (index = image number modulo len).
ENCODINGS = (
    "mono2_u16_explicit",
    "mono1_u16_implicit",
    "signed_rescale_window",
    "mono2_u8",
    "rle",
    "j2k_lossless",
    "big_endian",
    "j2k_lossy",
)


@dataclass(frozen=True)
class SynthResult:
    out: Path
    labels_csv: Path
    files: list[Path]
    labels: dict[str, str]  # relative path -> class
    patients: dict[str, str]  # relative path -> raw patient ID (for tests only)
    sites: dict[str, int] = field(default_factory=dict)  # relative path -> site index (:data:`SITES`)


#: The synthetic sites: (0008,0080) Institution Name, (0008,0070) Manufacturer, (0008,1090) model.
SITES = (("Synthetic General Hospital", "Acme Imaging", "CR-1000"),
         ("Synthetic Valley Clinic", "Zenith Medical", "DR-20"),
         ("Synthetic Coast Infirmary", "Acme Imaging", "CR-2000"),
         ("Synthetic Hill Hospital", "Nordlicht", "XR-5"))
#: The day every synthetic study was taken (the patient's age is counted to it).
STUDY_DATE = _dt.date(2024, 1, 15)


def chest_phantom(size: int, finding: int | tuple[int, ...] | None, n_classes: int,
                  rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """A chest-like image in [0, 1] (higher = denser), with the finding of class index ``finding``
    (or the findings of several: each at its own place, so they can co-occur), its contrast scaled
    by ``strength`` (below 1: subtler; the random draws are the same whatever it is)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    jitter = rng.normal(0, 0.015, size=4)
    body = (((xx - 0.5) / 0.46) ** 2 + ((yy - 0.55) / 0.52) ** 2) < 1.0
    img = np.where(body, 0.55, 0.05)
    for cx in (0.31 + jitter[0], 0.69 + jitter[1]):  # lungs: dark
        lung = (((xx - cx) / 0.15) ** 2 + ((yy - 0.5 - jitter[2]) / 0.3) ** 2) < 1.0
        img = np.where(lung, 0.22, img)
    img += 0.12 * (np.abs(xx - 0.5) < 0.04)  # spine
    img += 0.06 * (np.sin(yy * 2 * np.pi * 7 + jitter[3] * 20) > 0.6) * body  # ribs
    shown = () if finding is None else (finding,) if isinstance(finding, (int, np.integer)) else tuple(finding)
    for f in shown:
        if f <= 0:
            continue
        k = n_classes - 1
        angle = 2 * np.pi * (f - 1) / max(k, 1)
        fx = 0.5 + (0.19 if np.cos(angle) >= 0 else -0.19) + rng.normal(0, 0.02)
        fy = 0.5 + 0.15 * np.sin(angle) + rng.normal(0, 0.02)
        r = 0.085 + rng.normal(0, 0.008)
        blob = np.exp(-(((xx - fx) ** 2 + (yy - fy) ** 2) / (2 * r**2)))
        img += 0.45 * strength * blob
    img += rng.normal(0, 0.02, img.shape)
    return np.clip(img, 0.0, 1.0)


def _base_dataset(patient_id: str, patient_idx: int, image_idx: int, rng: np.random.Generator,
                  site: int = 0) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    sop_uid = generate_uid()
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = f"Synthetic^Patient{patient_idx:04d}"
    ds.PatientID = patient_id
    birth = _dt.date(1940, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 365 * 60)))
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = "F" if rng.random() < 0.5 else "M"
    ds.StudyDate = STUDY_DATE.strftime("%Y%m%d")
    ds.PatientAge = f"{(STUDY_DATE - birth).days * 4 // 1461:03d}Y"
    ds.InstitutionName, ds.Manufacturer, ds.ManufacturerModelName = SITES[site % len(SITES)]
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.InstanceNumber = image_idx + 1
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    return ds


def encode(ds: Dataset, img: np.ndarray, encoding: str) -> Dataset:
    """Store the [0, 1] image ``img`` in ``ds`` with the named encoding (see :data:`ENCODINGS`)."""
    if encoding in ("mono2_u16_explicit", "rle", "j2k_lossless", "j2k_lossy", "big_endian"):
        stored = np.rint(img * 4095).astype(np.uint16)
        ds.set_pixel_data(stored, "MONOCHROME2", 12)
        if encoding == "rle":
            ds.compress(RLELossless)
        elif encoding == "j2k_lossless":
            ds.compress(JPEG2000Lossless)
        elif encoding == "j2k_lossy":
            ds.compress(JPEG2000, j2k_cr=[15])
        elif encoding == "big_endian":
            ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
            ds.PixelData = stored.astype(">u2").tobytes()
    elif encoding == "mono1_u16_implicit":
        stored = np.rint((1.0 - img) * 16383).astype(np.uint16)
        ds.set_pixel_data(stored, "MONOCHROME1", 14)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif encoding == "signed_rescale_window":
        hu = img * 3000.0 - 1000.0  # modality values
        stored = np.rint(hu / 2.0).astype(np.int16)  # slope 2, intercept 0 → signed stored values
        ds.set_pixel_data(stored, "MONOCHROME2", 16)
        ds.RescaleSlope = 2
        ds.RescaleIntercept = 0
        ds.RescaleType = "US"
        ds.WindowCenter = [500, 300]  # the first window covers the whole range; the second would clip
        ds.WindowWidth = [3001, 800]
    elif encoding == "mono2_u8":
        stored = np.rint(img * 255).astype(np.uint8)
        ds.set_pixel_data(stored, "MONOCHROME2", 8)
    else:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
    return ds


def synthesize(
    out: str | Path,
    patients: int = 40,
    images_per_patient: int = 2,
    classes: tuple[str, ...] = ("normal", "finding"),
    size: int = 256,
    seed: int = 0,
    encodings: tuple[str, ...] = ENCODINGS,
    sites: int = 1,
    subtle_site: int | None = None,
    subtle_strength: float = 0.3,
    strength: float | tuple[float, float] = 1.0,
) -> SynthResult:
    """Write ``patients * images_per_patient`` DICOM files and ``OUT/labels.csv``.

    Patients are spread over ``sites`` of :data:`SITES` independently of their class (every site
    has every class); in ``subtle_site`` the finding has ``subtle_strength`` of its contrast, so a
    model finds it less well there (the gap ``evaluate --by site`` should show). ``strength`` scales
    the finding's contrast everywhere (below 1: a harder task); a ``(low, high)`` pair draws each
    image's from that range (seeded apart from the images), so some findings are faint and some
    nearly invisible, as in real films: no model separates every image (the demo uses it)."""
    if len(classes) < 2:
        raise ValueError(f"synth needs at least 2 classes. Received: classes={classes!r}")
    if patients < len(classes):
        raise ValueError(f"synth needs at least one patient per class. Received: patients={patients}, "
                         f"classes={classes}")
    low, high = (strength, strength) if isinstance(strength, (int, float)) else strength
    if not 0 <= low <= high <= 1 or high == 0:
        raise ValueError(f"the finding's strength must be in (0, 1], or a range (low, high) within [0, 1]. "
                         f"Received: strength={strength}")
    draw = np.random.default_rng([seed, 1])  # apart from the images' generator: a fixed strength draws nothing
    if subtle_site is not None and not 0 <= subtle_site < sites:
        raise ValueError(f"the subtle site must be one of the {sites} sites (0-{sites - 1}). "
                         f"Received: subtle_site={subtle_site}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files: list[Path] = []
    labels: dict[str, str] = {}
    pids: dict[str, str] = {}
    site_of: dict[str, int] = {}
    per_class = [0] * len(classes)  # each class rotates through the encodings on its own
    for p in range(patients):
        cls_idx = p % len(classes)
        site = (p // len(classes)) % max(1, sites)  # not the class's: every site has every class
        patient_id = f"SYN{seed:03d}{p:05d}"
        for i in range(images_per_patient):
            enc = encodings[per_class[cls_idx] % len(encodings)]
            per_class[cls_idx] += 1
            rel = f"images/p{p:05d}_{i:02d}_{enc}.dcm"
            image = Radiograph(patient_id, (cls_idx,), len(classes) - 1, enc, "PA", p, i, site,
                               (low if low == high else float(draw.uniform(low, high)))
                               * (subtle_strength if site == subtle_site else 1.0))
            files.append(write_image(out / rel, image, size, rng))
            labels[rel] = classes[cls_idx]
            pids[rel] = patient_id
            site_of[rel] = site
    return SynthResult(out=out, labels_csv=_write_labels(out, labels), files=files, labels=labels, patients=pids,
                       sites=site_of)


def _write_labels(out: Path, labels: dict[str, str]) -> Path:
    labels_csv = out / "labels.csv"
    with labels_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for rel, lab in labels.items():
            w.writerow([rel, lab])
    return labels_csv


@dataclass(frozen=True)
class Radiograph:
    """What one synthetic file shows and how it is stored (:func:`write_image`)."""

    patient_id: str  #: (0010,0020) Patient ID, written in the header as given
    findings: tuple[int, ...] = ()  #: 1-based indices among ``n_findings``; empty: no finding
    n_findings: int = 1  #: how many findings the cohort has (their places in the lungs follow from it)
    encoding: str = "mono2_u8"  #: one of :data:`ENCODINGS`
    view: str | None = "PA"  #: (0018,5101) View Position; None: the element is left out
    patient_idx: int = 0  #: numbers the synthetic Patient Name
    image_idx: int = 0  #: numbers the Instance Number
    site: int = 0  #: index into :data:`SITES` (institution, manufacturer, model)
    strength: float = 1.0  #: the finding's contrast (below 1: subtler)


def write_image(path: str | Path, image: Radiograph, size: int, rng: np.random.Generator) -> Path:
    """One synthetic ``size`` px radiograph at ``path``, as ``image`` describes it. Tests build the
    public cohorts' layouts from it."""
    img = chest_phantom(size, image.findings, image.n_findings + 1, rng, image.strength)
    ds = _base_dataset(image.patient_id, image.patient_idx, image.image_idx, rng, image.site)
    if image.view is None:
        del ds.ViewPosition
    else:
        ds.ViewPosition = image.view
    ds = encode(ds, img, image.encoding)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def synthesize_multilabel(
    out: str | Path,
    patients: int = 48,
    images_per_patient: int = 2,
    findings: tuple[str, ...] = ("Effusion", "Nodule"),
    size: int = 96,
    seed: int = 0,
    encodings: tuple[str, ...] = ENCODINGS,
) -> SynthResult:
    """A multi-label cohort: patient ``p`` shows the ``p``-th combination of ``findings`` (binary
    counting: none, the first, the second, both, …), so findings co-occur on one image; labels.csv
    holds ``normal`` or the findings joined by ``|``. Each combination rotates through the
    encodings on its own, as :func:`synthesize`'s classes do."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    combos = 1 << len(findings)
    files: list[Path] = []
    labels: dict[str, str] = {}
    pids: dict[str, str] = {}
    per_combo = [0] * combos
    for p in range(patients):
        combo = p % combos
        shown = tuple(i + 1 for i in range(len(findings)) if combo >> i & 1)
        label = "|".join(sorted(findings[i - 1] for i in shown)) or "normal"
        patient_id = f"SYN{seed:03d}{p:05d}"
        for i in range(images_per_patient):
            enc = encodings[per_combo[combo] % len(encodings)]
            per_combo[combo] += 1
            rel = f"images/p{p:05d}_{i:02d}_{enc}.dcm"
            image = Radiograph(patient_id, shown, len(findings), enc, "PA", p, i)
            files.append(write_image(out / rel, image, size, rng))
            labels[rel] = label
            pids[rel] = patient_id
    return SynthResult(out=out, labels_csv=_write_labels(out, labels), files=files, labels=labels, patients=pids)
