"""Typed, immutable configuration shared by the CLI, the jobs and every Ray worker.

One config object is built from the command line (or a YAML file), validated once in
``__post_init__``, and shipped as is to workers; a sweep derives trial configs with
``dataclasses.replace``. Defaults live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

#: Bumped whenever the pixel pipeline in :mod:`xray_dist.dicom` changes what it produces, so an
#: old cache can never be mistaken for a new one.
PIPELINE_VERSION = 1


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
    """

    image_size: int = 224
    aspect: str = "pad"
    storage_dtype: str = "uint8"
    window: str = "first"
    pipeline_version: int = PIPELINE_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or not 8 <= self.image_size <= 4096:
            raise ValueError(f"image_size must be an integer in [8, 4096]. Received: image_size={self.image_size!r}")
        if self.aspect != "pad":
            raise ValueError(f"aspect must be 'pad'. Received: aspect={self.aspect!r}")
        if self.storage_dtype != "uint8":
            raise ValueError(f"storage_dtype must be 'uint8'. Received: storage_dtype={self.storage_dtype!r}")
        if self.window != "first":
            raise ValueError(f"window must be 'first'. Received: window={self.window!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PreprocessSpec":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


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
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0
    address: str | None = None
    num_cpus: int | None = None

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1). Received: {name}={v!r}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                "val_fraction + test_fraction must leave some patients for training. "
                f"Received: val_fraction={self.val_fraction}, test_fraction={self.test_fraction}"
            )


def stable_hash(obj: Any) -> str:
    """A short, stable hash of a JSON-serialisable object (used for cache keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_yaml_overrides(path: str | None) -> dict[str, Any]:
    """Read a ``--config`` YAML file of flag values (keys spelled like the flags, ``-`` or ``_``)."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config file not found: {path}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
