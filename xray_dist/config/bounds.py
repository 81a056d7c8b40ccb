"""The bounds of every number of every config: one table, and the check that enforces it.

Every number of every config is checked against one table, :data:`BOUNDS`, by
:func:`check_fields` (called first in each ``__post_init__``), whatever set it: a YAML file, a
flag, a sweep's range or Python. An integer field takes only integers, a float field only finite
numbers (NaN and ±inf are refused), ``True``/``False`` are not numbers, and a string is not a
number (the CLI converts ``lr: 1e-4`` and ``epochs: '3'`` before that,
:func:`xray_dist.config.values.coerce`). A sweep's values (``head_widths``, ``num_classes``,
``unfreeze_blocks``, ``lr``, ``combos``) are each held to the bound of the training field they
set. A value outside its bound is a :class:`ConfigError` naming the key, repeating the value and
giving the range (the CLI: exit 2, one line). ``[a, b]`` holds both ends; ``(a, b]`` and
``[a, b)`` leave one out. The table below is the documentation; a test checks that it says what
:data:`BOUNDS` enforces.

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
dicomweb_connections [1, 64]               decode tasks retrieving from one archive at once
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
import functools
import math
import numbers
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from xray_dist.errors import ConfigError

#: Bumped whenever the pixel pipeline in :mod:`xray_dist.data.dicom` changes what it produces, so an
#: old cache can never be mistaken for a new one.
PIPELINE_VERSION = 2


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
    "dicomweb_connections": Bound(1, 64, "decode tasks retrieving from one archive at once"),
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
def field_hints(cls) -> dict[str, Any]:
    """``cls``'s field types, resolved once (the annotations are strings here)."""
    return typing.get_type_hints(cls)


def check_number(key: str, value: Any, base: type, bound: Bound, shown: Any = None,
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
    hints = field_hints(type(obj))
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
            value = check_number(f.name, value, base, BOUNDS[f.name], hi=(hi or {}).get(f.name))
        elif kind == "tuple" and base in (int, float):
            bound = BOUNDS[ELEMENT_BOUNDS[f.name]]
            if not isinstance(value, (tuple, list)) or not value:
                raise ConfigError(f.name, f"{f.name} must be a list of one or more values in {bound.text()}. "
                                          f"Received: {f.name}={value!r}")
            value = tuple(check_number(f.name, v, base, bound, shown=value) for v in value)
        else:
            continue
        object.__setattr__(obj, f.name, value)
