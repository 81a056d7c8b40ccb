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
from typing import Any, Mapping

import yaml

#: Bumped whenever the pixel pipeline in :mod:`xray_dist.dicom` changes what it produces, so an
#: old cache can never be mistaken for a new one.
PIPELINE_VERSION = 2


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
            (:mod:`xray_dist.j2k`); specs written before it existed (pipeline 1) never reduce.
    """

    image_size: int = 224
    aspect: str = "pad"
    storage_dtype: str = "uint8"
    window: str = "first"
    j2k_reduce: bool = True
    burned_in: str = "reject"
    pipeline_version: int = PIPELINE_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or not 8 <= self.image_size <= 4096:
            raise ValueError(f"image_size must be an integer in [8, 4096]. Received: image_size={self.image_size!r}")
        if self.aspect != "pad":
            raise ValueError(f"aspect must be 'pad'. Received: aspect={self.aspect!r}")
        if self.storage_dtype != "uint8":
            raise ValueError(f"storage_dtype must be 'uint8'. Received: storage_dtype={self.storage_dtype!r}")
        if self.burned_in not in ("reject", "keep"):
            raise ValueError(f"burned_in must be 'reject' or 'keep'. Received: burned_in={self.burned_in!r}")
        if self.window != "first":
            raise ValueError(f"window must be 'first'. Received: window={self.window!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
    salt_file: str | None = None  # where the patient-key salt lives (default: CACHE/.salt)
    paths: str = "relative"  # how the cache and report name files: "relative" or "redact" (xray_dist.paths)
    path_map: str | None = None  # with "redact": where to write key -> path (never inside the cache)
    split_files: tuple[str, ...] = ()  # official splits (xray_dist.splits.read_split_files) instead of drawn ones
    labels_format: str = "csv"  # csv | nih | chexpert | rsna | mimic (xray_dist.labels)
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
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1). Received: {name}={v!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0. Received: seed={self.seed}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1. Received: num_cpus={self.num_cpus}")
        if self.split_files and self.test_fraction:
            raise ValueError("test_fraction and split_files both choose test patients; give one (the split file's "
                             "test list, or --test-fraction)")
        from xray_dist.labels import FORMATS

        if self.labels_format not in FORMATS:
            raise ValueError(f"labels_format must be one of {', '.join(FORMATS)}. "
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
    from xray_dist import storage

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
    from xray_dist import storage

    try:
        data = yaml.safe_load(storage.read_text(path)) or {}
    except (FileNotFoundError, IsADirectoryError):
        raise ValueError(f"--config file not found: {path}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def coerce(cls, values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values`` converted to the types of ``cls``'s fields, where the meaning is clear.

    YAML reads ``1e-4`` as a string (it wants ``1.0e-4``) and a flag file may quote numbers; such
    strings become the field's number. Anything else of the wrong type — ``epochs: ten``, a list
    for a number, a number for a name — is a ``ValueError`` naming the key, the value and the type
    expected (``source`` says where the value came from).
    """
    import typing

    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        hint = hints.get(key)
        if hint is None:
            out[key] = value
            continue
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        name = getattr(base, "__name__", str(base))
        if value is None and optional:
            out[key] = None
            continue
        try:
            if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = float(value)
            elif base is int and isinstance(value, int) and not isinstance(value, bool):
                out[key] = value
            elif base is int and isinstance(value, float) and value.is_integer():
                out[key] = int(value)
            elif base in (int, float) and isinstance(value, str):
                out[key] = base(value.strip())
            elif base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
                out[key] = str(value)
            elif base is bool and isinstance(value, bool):
                out[key] = value
            elif base not in _SCALARS.values():
                out[key] = value  # tuples and nested configs are checked by their own classes
            else:
                raise TypeError
        except (TypeError, ValueError):
            raise ValueError(f"{source}: {key}: expected {name}{' or null' if optional else ''}, "
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
            task the K most frequent findings; see :mod:`xray_dist.classes`.
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
            fits, every worker holds all of it (read once) and trains on its part of one seeded
            permutation per epoch: the order depends on (seed, epoch) alone, so a resumed run is
            exact (:class:`xray_dist.train.ShardCache`). Otherwise each worker streams Ray Data's
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
    task: str = "auto"  # multiclass | multilabel | auto (the cache decides: xray_dist.train.resolve_task)
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
        checks = [
            (self.epochs >= 1, "epochs must be >= 1", "epochs"),
            (self.seed >= 0, "seed must be >= 0", "seed"),
            (self.max_failures >= -1, "max_failures must be >= 0 (or -1: retry forever)", "max_failures"),
            (self.cpus_per_worker is None or self.cpus_per_worker > 0, "cpus_per_worker must be > 0",
             "cpus_per_worker"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1", "keep_checkpoints"),
            (self.shuffle_buffer >= 0, "shuffle_buffer must be >= 0", "shuffle_buffer"),
            (self.batch_size >= 1, "batch_size must be >= 1", "batch_size"),
            (self.lr > 0, "lr must be > 0", "lr"),
            (self.head_width >= 0, "head_width must be >= 0 (0 = no hidden layer)", "head_width"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)", "dropout"),
            (0 <= self.unfreeze_blocks <= 5, "unfreeze_blocks must be in 0..5", "unfreeze_blocks"),
            (self.num_workers >= 1, "num_workers must be >= 1", "num_workers"),
            (self.gpus_per_worker >= 0, "gpus_per_worker must be >= 0", "gpus_per_worker"),
            (self.num_classes is None or self.num_classes >= 1,
             "num_classes must be >= 1 (findings of a multi-label task; >= 2 classes otherwise)", "num_classes"),
            (self.task in ("auto", "multiclass", "multilabel"), "task must be auto, multiclass or multilabel", "task"),
            (self.mixed_precision in ("auto", "on", "off"), "mixed_precision must be auto|on|off", "mixed_precision"),
            (self.cpu_replicas >= 0, "cpu_replicas must be >= 0", "cpu_replicas"),
            (self.worker_cache_mb >= 0, "worker_cache_mb must be >= 0 (0 = stream every epoch)", "worker_cache_mb"),
            (self.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
             "placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD", "placement_strategy"),
        ]
        for ok, msg, name in checks:
            if not ok:
                raise ValueError(f"{msg}. Received: {name}={getattr(self, name)!r}")
        if self.cpu_replicas and self.gpus_per_worker:
            raise ValueError("cpu_replicas splits the CPU when there are no GPUs; it cannot be combined with "
                             f"gpus_per_worker={self.gpus_per_worker}. Drop one of them.")
        if not self.weights:
            raise ValueError("weights must be 'imagenet', 'none' or a path to a .h5 file")

    @property
    def worker_cpus(self) -> float:
        if self.cpus_per_worker is not None:
            return self.cpus_per_worker
        return 1.0 if self.gpus_per_worker else 0.5

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved(self) -> "TrainConfig":
        """Paths made absolute against the driver's working directory (Ray workers and Tune trials
        run elsewhere, so a relative ``cache`` would point nowhere)."""
        weights = self.weights if self.weights in ("imagenet", "none") else _absolute(self.weights)
        features = _absolute(self.features) if self.features else None
        return dataclasses.replace(self, cache=_absolute(self.cache), out=_absolute(self.out), weights=weights,
                                   features=features)


def _absolute(path: str) -> str:
    from xray_dist import storage

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
        if self.scheduler not in ("asha", "fifo"):
            raise ValueError(f"scheduler must be asha or fifo. Received: scheduler={self.scheduler!r}")
        if self.search not in ("grid", "random", "optuna"):
            raise ValueError(f"search must be grid, random or optuna. Received: search={self.search!r}")
        if self.combos and self.search != "grid":
            raise ValueError(f"combos lists the trials of a grid; search={self.search!r} draws its own. "
                             "Drop --combos or use --search grid")
        if self.trial_runner not in ("auto", "inprocess", "train"):
            raise ValueError(f"trial_runner must be auto, inprocess or train. Received: trial_runner={self.trial_runner!r}")
        if not (0 < self.lr[0] <= self.lr[1]):
            raise ValueError(f"lr must be MIN,MAX with 0 < MIN <= MAX. Received: lr={self.lr!r}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1. Received: num_samples={self.num_samples}")
        if not 1 <= self.grace_period <= self.base.epochs:
            raise ValueError(f"grace_period must be in [1, epochs={self.base.epochs}]. "
                             f"Received: grace_period={self.grace_period}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1. Received: max_concurrent={self.max_concurrent}")
        for c in self.combos or ():
            if len(c) != 3 or not (0 <= c[0] <= 1 << 16 and 1 <= c[1] <= 1000 and 0 <= c[2] <= 5):
                raise ValueError("combos are W:K:D triples with head width W >= 0, classes K >= 1 and unfreeze "
                                 f"depth D in 0..5. Received: {':'.join(map(str, c))}")
        for name, values, lo, hi in (("head_widths", self.head_widths, 0, 1 << 16),
                                     ("num_classes", self.num_classes, 1, 1000),
                                     ("unfreeze_blocks", self.unfreeze_blocks, 0, 5)):
            if not values or any(not lo <= v <= hi for v in values):
                raise ValueError(f"{name} values must be in [{lo}, {hi}]. Received: {name}={values!r}")
