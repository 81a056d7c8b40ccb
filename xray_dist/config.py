"""Typed, immutable configuration shared by the CLI, the jobs and every Ray worker.

One config object is built from the command line (or a YAML file), validated once in
``__post_init__``, and shipped as is to workers; a sweep derives trial configs with
``dataclasses.replace``. Defaults live here and nowhere else.

Bounds
------
Every number of every config here is checked against one table, :data:`BOUNDS`, by
:func:`check_fields` (called first in each ``__post_init__``), whatever set it: a YAML file, a
flag, a sweep's range or Python. An integer field takes only integers, a float field only finite
numbers (NaN and ±inf are refused), ``True``/``False`` are not numbers, and a string is not a
number (the CLI converts ``lr: 1e-4`` and ``epochs: '3'`` before that, :func:`coerce`). A sweep's
values (``head_widths``, ``num_classes``, ``unfreeze_blocks``, ``lr``, ``combos``) are each held
to the bound of the training field they set. A value outside its bound is a :class:`ConfigError`
naming the key, repeating the value and giving the range (the CLI: exit 2, one line). ``[a, b]``
holds both ends; ``(a, b]`` and ``[a, b)`` leave one out. The table below is the documentation;
a test checks that it says what :data:`BOUNDS` enforces.

===================  ====================  ==============================================================
key                  allowed               why
===================  ====================  ==============================================================
image_size           [8, 4096]             pixels per side; 4096 is past any detector's useful resolution
pipeline_version     [1, 2]                the pixel pipelines this version knows (PIPELINE_VERSION)
max_pixels           [1, 1000000000]       pixels a header may declare; 10^9 is 8 GB of float64 work
val_fraction         [0, 1)                a share of the patients; 1 would leave none to train on
test_fraction        [0, 1)                a share of the patients; 1 would leave none to train on
seed                 [0, 4294967295]       numpy and TensorFlow take 32-bit unsigned seeds
num_cpus             [1, 4096]             CPUs of embedded local Ray, on one machine
epochs               [1, 10000]            a checkpoint every epoch; fine-tuning needs tens
batch_size           [1, 8192]             per replica; more VGG16 inputs than any accelerator holds
lr                   (0, 1]                Adam's step: 0 trains nothing, above 1 it diverges
head_width           [0, 65536]            hidden Dense units (0 = no hidden layer)
dropout              [0, 1)                the share of head units dropped; 1 would drop them all
num_classes          [1, 1000]             classes, or findings of a multi-label task
unfreeze_blocks      [0, 5]                VGG16 has five conv blocks
num_workers          [1, 1024]             Ray Train workers (one per node or GPU group)
gpus_per_worker      [0, 16]               a worker lives on one node; nodes hold at most 16 GPUs
cpus_per_worker      (0, 1024]             CPUs Ray reserves per worker, one node's worth at most
cpu_replicas         [0, 64]               logical CPU devices to mirror over (0 = off)
keep_checkpoints     [1, 100]              best checkpoints kept, each a whole model
max_failures         [-1, 1000]            worker failures survived (-1 = retry forever)
shuffle_buffer       [0, 1048576]          rows held for Ray Data's local shuffle
worker_cache_mb      [0, 1048576]          MiB per worker, 1 TiB at most (0 = stream every epoch)
num_samples          [1, 10000]            grid repeats, or drawn trials
max_concurrent       [1, 10000]            trials at once
grace_period         [1, 10000]            epochs before ASHA may stop a trial; also <= epochs
===================  ====================  ==============================================================
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import yaml

from xray_dist.errors import XrayDistError

#: Bumped whenever the pixel pipeline in :mod:`xray_dist.data.dicom` changes what it produces, so an
#: old cache can never be mistaken for a new one.
PIPELINE_VERSION = 2
#: Default :attr:`PreprocessSpec.max_pixels` (see there).
DEFAULT_MAX_PIXELS = 60_000_000

#: The labels formats prepare reads (:mod:`xray_dist.data.labels`).
LABELS_FORMATS = ("csv", "nih", "chexpert", "rsna", "mimic")


class ConfigError(XrayDistError, ValueError):
    """A configuration key or value that cannot be used; ``key`` names it, the message says what is
    allowed. A ``ValueError`` too, so callers that caught bad values before keep working."""

    def __init__(self, key: str, message: str):
        self.key = str(key)
        self.message = " ".join(str(message).split())  # one line
        super().__init__(self.message)

    def __reduce__(self):
        return (type(self), (self.key, self.message))


@dataclass(frozen=True)
class Bound:
    """The values a numeric config field may take: ``lo`` to ``hi``, each end held unless open."""

    lo: int | float
    hi: int | float
    why: str
    lo_open: bool = False
    hi_open: bool = False

    def text(self, hi_name: str | None = None) -> str:
        hi = f"{hi_name}={self.hi}" if hi_name else str(self.hi)
        return f"{'(' if self.lo_open else '['}{self.lo}, {hi}{')' if self.hi_open else ']'}"

    def below(self, v) -> bool:
        return v <= self.lo if self.lo_open else v < self.lo

    def above(self, v) -> bool:
        return v >= self.hi if self.hi_open else v > self.hi


_SHARE = "a share of the patients; 1 would leave none to train on"
#: Every numeric config field's bound, by field name (documented in the module docstring's table).
BOUNDS: dict[str, Bound] = {
    "image_size": Bound(8, 4096, "pixels per side; 4096 is past any detector's useful resolution"),
    "pipeline_version": Bound(1, PIPELINE_VERSION, "the pixel pipelines this version knows (PIPELINE_VERSION)"),
    "max_pixels": Bound(1, 10**9, "pixels a header may declare; 10^9 is 8 GB of float64 work"),
    "val_fraction": Bound(0, 1, _SHARE, hi_open=True),
    "test_fraction": Bound(0, 1, _SHARE, hi_open=True),
    "seed": Bound(0, 2**32 - 1, "numpy and TensorFlow take 32-bit unsigned seeds"),
    "num_cpus": Bound(1, 4096, "CPUs of embedded local Ray, on one machine"),
    "epochs": Bound(1, 10000, "a checkpoint every epoch; fine-tuning needs tens"),
    "batch_size": Bound(1, 8192, "per replica; more VGG16 inputs than any accelerator holds"),
    "lr": Bound(0, 1, "Adam's step: 0 trains nothing, above 1 it diverges", lo_open=True),
    "head_width": Bound(0, 65536, "hidden Dense units (0 = no hidden layer)"),
    "dropout": Bound(0, 1, "the share of head units dropped; 1 would drop them all", hi_open=True),
    "num_classes": Bound(1, 1000, "classes, or findings of a multi-label task"),
    "unfreeze_blocks": Bound(0, 5, "VGG16 has five conv blocks"),
    "num_workers": Bound(1, 1024, "Ray Train workers (one per node or GPU group)"),
    "gpus_per_worker": Bound(0, 16, "a worker lives on one node; nodes hold at most 16 GPUs"),
    "cpus_per_worker": Bound(0, 1024, "CPUs Ray reserves per worker, one node's worth at most", lo_open=True),
    "cpu_replicas": Bound(0, 64, "logical CPU devices to mirror over (0 = off)"),
    "keep_checkpoints": Bound(1, 100, "best checkpoints kept, each a whole model"),
    "max_failures": Bound(-1, 1000, "worker failures survived (-1 = retry forever)"),
    "shuffle_buffer": Bound(0, 1 << 20, "rows held for Ray Data's local shuffle"),
    "worker_cache_mb": Bound(0, 1 << 20, "MiB per worker, 1 TiB at most (0 = stream every epoch)"),
    "num_samples": Bound(1, 10000, "grid repeats, or drawn trials"),
    "max_concurrent": Bound(1, 10000, "trials at once"),
    "grace_period": Bound(1, 10000, "epochs before ASHA may stop a trial; also <= epochs"),
}

#: A sweep's value lists, each value held to the bound of the training field it sets.
ELEMENT_BOUNDS = {"head_widths": "head_width", "num_classes": "num_classes", "unfreeze_blocks": "unfreeze_blocks",
                  "lr": "lr"}
#: What a ``combos`` triple sets, in order.
COMBO_FIELDS = ("head_width", "num_classes", "unfreeze_blocks")
#: What ``TrainConfig.metric`` may name: reported every epoch, for every task, higher is better (Ray
#: keeps checkpoints and Tune ranks trials by it with mode "max").
METRICS = ("val_auc_abnormal", "val_auc", "val_accuracy")


def _field_kind(hint) -> tuple[str, Any]:
    """``(kind, base)`` of a field's type hint; kind is scalar, optional, tuple or other."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return "tuple", args[0] if args else Any
    if type(None) in args:
        base = next(a for a in args if a is not type(None))
        return ("optional", base) if base in (int, float, bool) else ("other", base)
    return ("scalar", hint) if hint in (int, float, bool) else ("other", hint)


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
    """``cls``'s field types, resolved once (the annotations are strings here)."""
    return typing.get_type_hints(cls)


def _number(key: str, value: Any, base: type, bound: Bound, shown: Any = None,
            hi: tuple[str, int] | None = None) -> int | float:
    """``value`` as a plain ``base`` (int or float) when it is one within ``bound`` (and at most
    ``hi``'s value, a bound another field sets); else a :class:`ConfigError` naming ``key``, the
    value (``shown``: the whole list it came in) and the range."""
    shown = value if shown is None else shown
    allowed = f"(allowed: {bound.text()}; {bound.why}). Received: {key}={shown!r}"
    what = "an integer" if base is int else "a finite number"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if base is int else numbers.Real):
        note = ", not true/false" if isinstance(value, bool) else ""
        raise ConfigError(key, f"{key} must be {what}{note} {allowed}")
    if not isinstance(value, numbers.Integral) and not math.isfinite(value):
        raise ConfigError(key, f"{key} must be {what} {allowed}")
    if hi is not None and (bound.below(value) or value > hi[1]):
        raise ConfigError(key, f"{key} must be in {dataclasses.replace(bound, hi=hi[1]).text(hi[0])} {allowed}")
    if bound.below(value):
        raise ConfigError(key, f"{key} must be {'>' if bound.lo_open else '>='} {bound.lo} {allowed}")
    if bound.above(value):
        raise ConfigError(key, f"{key} must be {'<' if bound.hi_open else '<='} {bound.hi} {allowed}")
    return int(value) if base is int else float(value)


def check_fields(obj, hi: Mapping[str, tuple[str, int]] | None = None) -> None:
    """Check every numeric and boolean field of the dataclass ``obj`` against :data:`BOUNDS`, and
    store each number as a plain ``int`` or ``float`` (a numpy scalar becomes a Python number, so
    the config stays JSON-writable). ``hi`` lowers a field's upper bound to another field's value,
    by name: ``{"grace_period": ("epochs", 5)}``. A numeric field without a bound is a
    ``KeyError``: a new number needs its row in the table."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        kind, base = _field_kind(hints[f.name])
        value = getattr(obj, f.name)
        if kind == "optional" and value is None:
            continue
        if base is bool and kind in ("scalar", "optional"):
            if not isinstance(value, bool):
                raise ConfigError(f.name, f"{f.name} must be true or false. Received: {f.name}={value!r}")
            continue
        if kind in ("scalar", "optional") and base in (int, float):
            value = _number(f.name, value, base, BOUNDS[f.name], hi=(hi or {}).get(f.name))
        elif kind == "tuple" and base in (int, float):
            bound = BOUNDS[ELEMENT_BOUNDS[f.name]]
            if not isinstance(value, (tuple, list)) or not value:
                raise ConfigError(f.name, f"{f.name} must be a list of one or more values in {bound.text()}. "
                                          f"Received: {f.name}={value!r}")
            value = tuple(_number(f.name, v, base, bound, shown=value) for v in value)
        else:
            continue
        object.__setattr__(obj, f.name, value)


def check_keys(keys: Iterable[str], allowed: Iterable[str], source: str, command: str) -> None:
    """Refuse keys of a config file that are not flags of ``xray-dist command``: one line naming
    them, with the nearest flag names (``epoch``: did you mean ``epochs``?)."""
    allowed = sorted(allowed)
    unknown = sorted(set(keys) - set(allowed))
    if not unknown:
        return
    hints = []
    for k in unknown:
        near = difflib.get_close_matches(k, allowed, n=3, cutoff=0.6)
        hints.append(f"{k}: did you mean {' or '.join(near)}?" if near else f"{k}: no flag is close")
    raise ConfigError(unknown[0], f"{source}: unknown keys {unknown}, not flags of `xray-dist {command}` "
                                  f"({'; '.join(hints)}; see `xray-dist {command} --help`)")


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
    burned_in: str = "reject"
    pipeline_version: int = PIPELINE_VERSION
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        check_fields(self)
        if self.aspect != "pad":
            raise ValueError(f"aspect must be 'pad'. Received: aspect={self.aspect!r}")
        if self.storage_dtype != "uint8":
            raise ValueError(f"storage_dtype must be 'uint8'. Received: storage_dtype={self.storage_dtype!r}")
        if self.burned_in not in ("reject", "keep"):
            raise ValueError(f"burned_in must be 'reject' or 'keep'. Received: burned_in={self.burned_in!r}")
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
    salt_file: str | None = None  # where the patient-key salt lives (default: xray_dist.data.salt, never the cache)
    paths: str = "relative"  # how the cache and report name files: "relative" or "redact" (xray_dist.data.paths)
    path_map: str | None = None  # with "redact": where to write key -> path (never inside the cache)
    split_files: tuple[str, ...] = ()  # official splits (xray_dist.data.splits.read_split_files) instead of drawn ones
    labels_format: str = "csv"  # csv | nih | chexpert | rsna | mimic (xray_dist.data.labels)
    uncertain: str = "ignore"  # chexpert/mimic -1 entries: ignore (masked) | zeros | ones
    metadata: str | None = None  # mimic: mimic-cxr-2.0.0-metadata.csv (dicom_id -> study_id, ViewPosition)
    views: tuple[str, ...] = ()  # keep only these views (View Position: PA, AP, LL, ...); () keeps all
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0
    address: str | None = None
    num_cpus: int | None = None

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
        if self.uncertain not in ("ignore", "zeros", "ones"):
            raise ValueError(f"uncertain must be ignore, zeros or ones. Received: uncertain={self.uncertain!r}")
        if self.labels_format == "mimic" and not self.metadata:
            raise ValueError("labels_format='mimic' joins the label CSV to the DICOM files through "
                             "mimic-cxr-2.0.0-metadata.csv: give metadata (--metadata)")
        if self.paths not in ("relative", "redact"):
            raise ValueError(f"paths must be 'relative' or 'redact'. Received: paths={self.paths!r}")
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
    from xray_dist.infra import storage

    p, b = storage.absolute(path).rstrip("/"), storage.absolute(base).rstrip("/")
    return not (p == b or p.startswith(b + "/"))


def stable_hash(obj: Any) -> str:
    """A short, stable hash of a JSON-serialisable object (used for cache keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_yaml_overrides(path: str | None) -> dict[str, Any]:
    """Read a ``--config`` YAML file of flag values (keys spelled like the flags, ``-`` or ``_``)."""
    if not path:
        return {}
    from xray_dist.infra import storage

    try:
        data = yaml.safe_load(storage.read_text(path)) or {}
    except (FileNotFoundError, IsADirectoryError):
        raise ValueError(f"--config file not found: {path}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def coerce_scalar(base: type, value: Any) -> Any:
    """``value`` as ``base`` (int, float, str or bool) where the meaning is clear: a number written
    as a string (``'3'``, ``1e-4``) becomes the number, a whole float an int; ``True`` is no number
    and ``2.5`` no int. ``TypeError`` or ``ValueError`` otherwise. The range is
    :func:`check_fields`'s business."""
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if base in (int, float) and isinstance(value, str):
        return base(value.strip())
    if base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if base is bool and isinstance(value, bool):
        return value
    raise TypeError(f"expected {getattr(base, '__name__', base)}, got {value!r}")


def coerce(cls, values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values`` converted to the types of ``cls``'s fields, where the meaning is clear.

    YAML reads ``1e-4`` as a string (it wants ``1.0e-4``) and a flag file may quote numbers; such
    strings become the field's number. Anything else of the wrong type — ``epochs: ten``, a list
    for a number, a number for a name — is a :class:`ConfigError` naming the key, the value and the
    type expected (``source`` says where the value came from). Ranges are checked by the class.
    """
    hints = _hints(cls)
    out = {}
    for key, value in values.items():
        hint = hints.get(key)
        if hint is None:
            out[key] = value
            continue
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if optional else hint
        name = getattr(base, "__name__", str(base))
        if value is None and optional:
            out[key] = None
            continue
        if base not in _SCALARS.values():
            out[key] = value  # tuples and nested configs are checked by their own classes
            continue
        try:
            out[key] = coerce_scalar(base, value)
        except (TypeError, ValueError):
            raise ConfigError(key, f"{source}: {key}: expected {name}{' or null' if optional else ''}, "
                                   f"got {value!r}") from None
    return out


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; the same object reaches every Ray worker.

    Attributes:
        cache: a directory written by ``xray-dist prepare``.
        out: the run directory (metrics, history, plots, exported model, Ray checkpoints).
        epochs, batch_size, lr: ``batch_size`` is per replica; the global batch is
            ``batch_size * replicas`` (replicas = workers × devices per worker).
        head_width: hidden Dense units before the logits (0 = no hidden layer).
        num_classes: class scheme size K (None = every label): classes, or for a multi-label
            task the K most frequent findings; see :mod:`xray_dist.data.classes`.
        task: ``multiclass`` (one label per image), ``multilabel`` (K sigmoid outputs, one per
            finding) or ``auto`` (multi-label when the cache's labels hold several findings).
        negative_class: the label that counts as negative for ``val_auc_abnormal``.
        unfreeze_blocks: how many of VGG16's 5 conv blocks train, counted from the top.
        weights: ``imagenet``, ``none`` or a path to a VGG16 no-top ``.h5`` weights file.
        num_workers, gpus_per_worker, cpus_per_worker: Ray Train scaling. ``cpus_per_worker``
            defaults to 0.5 without GPUs (so Ray Data keeps CPU on small machines) and 1 with them.
        cpu_replicas: split the CPU into this many logical devices and mirror across them; it
            exercises the multi-device-per-worker path on a machine without GPUs (tests, demo).
        placement_strategy: how Ray places the workers (``STRICT_SPREAD``: one per node).
        metric: what "best" means for kept checkpoints and the exported model.
        max_failures: worker failures survived by restarting from the last checkpoint.
        mixed_precision: ``auto`` (bf16/fp16 on GPU, fp32 on CPU), ``off`` or ``on``.
        worker_cache_mb: memory for training rows per worker. When the whole training split
            fits, every worker holds all of it (read once) and each replica trains its slice of
            every global batch of one seeded permutation per epoch (the same batches for any
            spread of the replicas): the order depends on (seed, epoch) alone, so a resumed run is
            exact (:class:`xray_dist.training.driver.ShardCache`). Otherwise each worker streams Ray Data's
            equal share, kept in memory after the first epoch when that fits; rank 0 keeps the
            validation set when it fits. 0 streams from Ray Data every epoch.
        shuffle_buffer: Ray Data's local shuffle buffer when a worker streams its share (the
            whole-split order above is a full permutation).
    """

    cache: str
    out: str
    epochs: int = 5
    batch_size: int = 16
    lr: float = 1e-4
    head_width: int = 0
    dropout: float = 0.3
    num_classes: int | None = None
    negative_class: str = "normal"
    task: str = "auto"  # multiclass | multilabel | auto (the cache decides: xray_dist.training.driver.resolve_task)
    unfreeze_blocks: int = 0
    weights: str = "imagenet"
    num_workers: int = 1
    gpus_per_worker: int = 0
    cpus_per_worker: float | None = None
    cpu_replicas: int = 0
    address: str | None = None
    seed: int = 0
    metric: str = "val_auc_abnormal"
    keep_checkpoints: int = 2
    max_failures: int = 2
    mixed_precision: str = "auto"
    shuffle_buffer: int = 256
    worker_cache_mb: int = 2048  # per worker: keep its training rows (and rank 0 the validation set) in memory
    placement_strategy: str = "PACK"
    features: str | None = None  # set by sweeps: a frozen-feature cache to train the top on
    mlflow: str | None = None  # MLflow tracking URI (default: MLFLOW_TRACKING_URI; none: no tracking)

    def __post_init__(self) -> None:
        check_fields(self)  # every number against BOUNDS
        checks = [
            (self.metric in METRICS, f"metric must be one of {', '.join(METRICS)}", "metric"),
            (self.task in ("auto", "multiclass", "multilabel"), "task must be auto, multiclass or multilabel", "task"),
            (self.mixed_precision in ("auto", "on", "off"), "mixed_precision must be auto|on|off", "mixed_precision"),
            (self.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
             "placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD", "placement_strategy"),
        ]
        for ok, msg, name in checks:
            if not ok:
                raise ConfigError(name, f"{msg}. Received: {name}={getattr(self, name)!r}")
        if self.cpu_replicas and self.gpus_per_worker:
            raise ConfigError("cpu_replicas", "cpu_replicas splits the CPU when there are no GPUs; it cannot be "
                                              f"combined with gpus_per_worker={self.gpus_per_worker}. Drop one.")
        if not self.weights:
            raise ConfigError("weights", "weights must be 'imagenet', 'none' or a path to a .h5 file")

    @property
    def worker_cpus(self) -> float:
        if self.cpus_per_worker is not None:
            return self.cpus_per_worker
        return 1.0 if self.gpus_per_worker else 0.5

    def to_dict(self) -> dict[str, Any]:
        """The settings as written (config.json, metrics.json): a tracking URI's credentials masked."""
        from xray_dist.infra.redaction import mask_credentials

        d = dataclasses.asdict(self)
        d["mlflow"] = mask_credentials(d["mlflow"]) if d.get("mlflow") else d.get("mlflow")
        return d

    def resolved(self) -> "TrainConfig":
        """Paths made absolute against the driver's working directory (Ray workers and Tune trials
        run elsewhere, so a relative ``cache`` would point nowhere)."""
        weights = self.weights if self.weights in ("imagenet", "none") else _absolute(self.weights)
        features = _absolute(self.features) if self.features else None
        return dataclasses.replace(self, cache=_absolute(self.cache), out=_absolute(self.out), weights=weights,
                                   features=features)


def _absolute(path: str) -> str:
    from xray_dist.infra import storage

    return storage.absolute(path)  # a URI stays as it is


@dataclass(frozen=True)
class SweepConfig:
    """A Ray Tune sweep over head width × number of classes × unfreeze depth (× learning rate).

    ``base`` is the training config every trial starts from; trials differ only by
    ``dataclasses.replace`` of the searched fields. ``search="grid"`` runs every combination of the
    three dimensions ``num_samples`` times (learning rate sampled log-uniformly in ``lr``);
    ``random`` draws ``num_samples`` configurations. ``combos`` replaces the full product of the
    three dimensions by an explicit list of ``(head_width, num_classes, unfreeze_blocks)``.
    """

    base: TrainConfig
    out: str
    num_samples: int = 1
    head_widths: tuple[int, ...] = (0, 64, 256)
    num_classes: tuple[int, ...] = (2,)
    unfreeze_blocks: tuple[int, ...] = (0, 1, 2)
    lr: tuple[float, float] = (1e-4, 1e-4)
    scheduler: str = "asha"
    search: str = "grid"
    max_concurrent: int | None = None
    shared_features: bool = True
    grace_period: int = 1
    resume_errored: bool = False  # a resumed sweep runs its failed trials again
    trial_runner: str = "auto"  # auto: one-worker trials train in their Tune process; train: always Ray Train
    combos: tuple[tuple[int, int, int], ...] | None = None  # explicit (head_width, num_classes, unfreeze_blocks)

    def __post_init__(self) -> None:
        if not isinstance(self.base, TrainConfig):
            raise ConfigError("base", f"base must be a TrainConfig. Received: base={self.base!r}")
        # every number against BOUNDS; each searched value against its training field's bound
        check_fields(self, hi={"grace_period": ("epochs", self.base.epochs)})
        if self.scheduler not in ("asha", "fifo"):
            raise ConfigError("scheduler", f"scheduler must be asha or fifo. Received: scheduler={self.scheduler!r}")
        if self.search not in ("grid", "random", "optuna"):
            raise ConfigError("search", f"search must be grid, random or optuna. Received: search={self.search!r}")
        if self.combos and self.search != "grid":
            raise ConfigError("combos", f"combos lists the trials of a grid; search={self.search!r} draws its own. "
                                        "Drop --combos or use --search grid")
        if self.trial_runner not in ("auto", "inprocess", "train"):
            raise ConfigError("trial_runner", "trial_runner must be auto, inprocess or train. "
                                              f"Received: trial_runner={self.trial_runner!r}")
        if len(self.lr) != 2 or not self.lr[0] <= self.lr[1]:
            raise ConfigError("lr", f"lr must be MIN,MAX with MIN <= MAX, each in {BOUNDS['lr'].text()}. "
                                    f"Received: lr={self.lr!r}")
        if self.combos is not None:
            object.__setattr__(self, "combos", tuple(self._combo(c) for c in self.combos))

    @staticmethod
    def _combo(c) -> tuple[int, int, int]:
        """One ``combos`` triple, each value held to the bound of the field it sets."""
        def refuse():
            fields = ", ".join(f"{n} {w} in {BOUNDS[n].text()}" for n, w in zip(COMBO_FIELDS, "WKD"))
            shown = ":".join(map(str, c)) if isinstance(c, (tuple, list)) else repr(c)
            return ConfigError("combos", f"combos are W:K:D triples with {fields}. Received: {shown}")

        if not isinstance(c, (tuple, list)) or len(c) != 3:
            raise refuse()
        try:
            return tuple(_number(n, v, int, BOUNDS[n]) for n, v in zip(COMBO_FIELDS, c))
        except ConfigError:
            raise refuse() from None
