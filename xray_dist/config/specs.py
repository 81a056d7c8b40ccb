"""How a DICOM file becomes a model input (:class:`PreprocessSpec`, written beside the cache and
carried by the model) and the settings of ``xray-dist prepare`` (:class:`PrepareConfig`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from xray_dist.config.bounds import PIPELINE_VERSION, check_fields
from xray_dist.config.choices import (BURNED_IN, LABELS_FORMATS, PATHS_POLICIES, UNCERTAIN, BurnedIn, LabelsFormat,
                                      PathsPolicy, Uncertain, either)
from xray_dist.infra import storage

#: Default :attr:`PreprocessSpec.max_pixels` (see there).
DEFAULT_MAX_PIXELS = 60_000_000


@dataclass(frozen=True)
class PreprocessSpec:
    """How one DICOM file becomes one model input. Written beside the cache, carried by the model.

    Attributes:
        image_size: side of the square model input, in pixels.
        aspect: ``"pad"`` — the shorter side is padded symmetrically with black (0 after
            MONOCHROME1 inversion) to a square before resizing, so no anatomy is cut off and
            nothing is stretched.
        storage_dtype: ``"uint8"``: the [0, 1] image is stored as ``round(x * 255)``. The model's
            VGG16 preprocessing works on 8-bit intensities, so 16-bit storage adds nothing.
        window: ``"first"``: when several (0028,1050)/(0028,1051) windows or VOI LUTs are
            present, the first is used (PS3.3 C.11.2 leaves the choice to the application).
        burned_in: ``"reject"``: an image whose (0028,0301) *Burned In Annotation* is YES carries
            text such as names in its pixels and is refused (quarantined by ``prepare``);
            ``"keep"`` uses it (specs written before the field existed keep, as they did).
        j2k_reduce: decode JPEG 2000 only to the resolution level that covers ``image_size``
            (:mod:`xray_dist.data.j2k`); specs written before it existed (pipeline 1) never reduce.
        max_pixels: the most pixels (Rows × Columns × frames × samples per pixel, read from the
            header before anything is decoded) a file may declare; larger files are refused
            (``too_large``). The default, 60 million, is above the largest real radiographs
            (a 43 × 43 cm detector at 100 µm is 18.5 MP; long-leg stitched images reach ~40 MP)
            and bounds a decode's memory to about 60 MP × 8 bytes of float64 work arrays. Left
            out of :meth:`to_dict` at its default, so caches and models from before it keep
            their keys.
    """

    image_size: int = 224
    aspect: str = "pad"
    storage_dtype: str = "uint8"
    window: str = "first"
    j2k_reduce: bool = True
    burned_in: BurnedIn = "reject"
    pipeline_version: int = PIPELINE_VERSION
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        check_fields(self)
        if self.aspect != "pad":
            raise ValueError(f"aspect must be 'pad'. Received: aspect={self.aspect!r}")
        if self.storage_dtype != "uint8":
            raise ValueError(f"storage_dtype must be 'uint8'. Received: storage_dtype={self.storage_dtype!r}")
        if self.burned_in not in BURNED_IN:
            raise ValueError(f"burned_in must be {either(BURNED_IN, quote=True)}. "
                             f"Received: burned_in={self.burned_in!r}")
        if self.window != "first":
            raise ValueError(f"window must be 'first'. Received: window={self.window!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["max_pixels"] == DEFAULT_MAX_PIXELS:
            del d["max_pixels"]  # the default: the spec (and every key made from it) as before the field existed
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PreprocessSpec":
        values = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        values.setdefault("j2k_reduce", False)  # older specs decoded JPEG 2000 in full
        values.setdefault("burned_in", "keep")  # ... and used images with burned-in annotation
        return cls(**values)


@dataclass(frozen=True)
class PrepareConfig:
    """Settings of ``xray-dist prepare``.

    The decoded-image cache depends only on the inputs and :attr:`preprocess`; the split
    (``val_fraction``, ``test_fraction``, ``seed``) lives in the manifest and can change without
    decoding anything again.
    """

    data_dir: str
    out: str
    labels: str | None = None
    path_column: str = "path"
    label_column: str = "label"
    patient_column: str | None = None  # the labels CSV's patient column (default: DICOM Patient ID)
    site_column: str | None = None  # the labels CSV's site column (default: a salted key of Institution Name)
    salt_file: str | None = None  # where the patient-key salt lives (default: xray_dist.data.salt, never the cache)
    paths: PathsPolicy = "relative"  # how the cache and report name files (xray_dist.data.paths)
    path_map: str | None = None  # with "redact": where to write key -> path (never inside the cache)
    split_files: tuple[str, ...] = ()  # official splits (xray_dist.data.splits.read_split_files) instead of drawn ones
    labels_format: LabelsFormat = "csv"  # xray_dist.data.labels
    uncertain: Uncertain = "ignore"  # chexpert/mimic -1 entries: ignore (masked), zeros or ones
    metadata: str | None = None  # mimic: mimic-cxr-2.0.0-metadata.csv (dicom_id -> study_id, ViewPosition)
    mimic_patients: str | None = None  # mimic: MIMIC-IV patients.csv (subject_id -> gender, anchor_age, anchor_year)
    views: tuple[str, ...] = ()  # keep only these views (View Position: PA, AP, LL, ...); () keeps all
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0
    address: str | None = None
    num_cpus: int | None = None
    dicomweb_connections: int = 4  # a DICOMweb source: decode tasks retrieving from the archive at once
    uid_names: bool = False  # a DICOMweb source: name images STUDY/SERIES/SOP (their UIDs) instead of salted keys

    def __post_init__(self) -> None:
        check_fields(self)
        if self.split_files and self.test_fraction:
            raise ValueError("test_fraction and split_files both choose test patients; give one (the split file's "
                             "test list, or --test-fraction)")
        if self.labels_format not in LABELS_FORMATS:
            raise ValueError(f"labels_format must be one of {', '.join(LABELS_FORMATS)}. "
                             f"Received: labels_format={self.labels_format!r}")
        if self.labels_format != "csv" and not self.labels:
            raise ValueError(f"labels_format={self.labels_format!r} reads a labels file: give labels (--labels)")
        if self.uncertain not in UNCERTAIN:
            raise ValueError(f"uncertain must be {either(UNCERTAIN)}. Received: uncertain={self.uncertain!r}")
        if self.labels_format == "mimic" and not self.metadata:
            raise ValueError("labels_format='mimic' joins the label CSV to the DICOM files through "
                             "mimic-cxr-2.0.0-metadata.csv: give metadata (--metadata)")
        if self.mimic_patients and self.labels_format != "mimic":
            raise ValueError("mimic_patients (--mimic-patients) gives MIMIC-IV patients' sex and age: it is for "
                             "labels_format='mimic'")
        if self.paths not in PATHS_POLICIES:
            raise ValueError(f"paths must be {either(PATHS_POLICIES, quote=True)}. Received: paths={self.paths!r}")
        archive = str(self.data_dir).lower().startswith("dicomweb+")
        if self.uid_names and not archive:
            raise ValueError("uid_names (--uid-names) names a DICOMweb source's images by their UIDs; files are "
                             "named by their path")
        if self.uid_names and (self.paths == "redact" or self.path_map):
            raise ValueError("uid_names (--uid-names) names images by their UIDs; --redact-paths and --path-map are "
                             "for salted keys: give one way")
        if archive and not self.uid_names:  # an archive's UIDs can identify a study: keys, unless asked
            object.__setattr__(self, "paths", "redact")
        if self.path_map and self.paths != "redact":
            raise ValueError("path_map is written with redacted paths only (--redact-paths)")
        if self.path_map and not storage_outside(self.path_map, self.out):
            raise ValueError(f"path_map {self.path_map} is inside the cache {self.out}: keep the key -> path map apart "
                             "from what is shared")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                "val_fraction + test_fraction must leave some patients for training. "
                f"Received: val_fraction={self.val_fraction}, test_fraction={self.test_fraction}"
            )


def storage_outside(path: str, base: str) -> bool:
    """Whether ``path`` lies outside the directory (or prefix) ``base``."""
    p, b = storage.absolute(path).rstrip("/"), storage.absolute(base).rstrip("/")
    return not (p == b or p.startswith(b + "/"))


def stable_hash(obj: Any) -> str:
    """A short, stable hash of a JSON-serialisable object (used for cache keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
