"""Typed, immutable configuration shared by the CLI, the jobs and every Ray worker.

One config object is built from the command line (or a YAML file), validated once in
``__post_init__``, and shipped as is to workers; a sweep derives trial configs with
``dataclasses.replace``. A config field's default is written once, in its dataclass; the CLI's
flags that set a field take their default (or the default their help shows) from there. Flags that
set no config field (synth's, predict's batch size, the bootstrap counts) keep their own defaults.

- :mod:`~xray_dist.config.choices`: every closed set of choices, as a ``Literal`` type (the
  parser's ``choices=`` and the configs' checks).
- :mod:`~xray_dist.config.bounds`: the bound of every number (:data:`BOUNDS`, documented as a
  table there) and :func:`check_fields`.
- :mod:`~xray_dist.config.values`: values from a ``--config`` file or flags, converted.
- :mod:`~xray_dist.config.specs`: :class:`PreprocessSpec` and :class:`PrepareConfig`.
- :mod:`~xray_dist.config.training`: :class:`TrainConfig` and :class:`SweepConfig`.

May import: :mod:`xray_dist.infra` and :mod:`xray_dist.errors` (and PyYAML).
"""

from xray_dist.config.bounds import (BOUNDS, COMBO_FIELDS, ELEMENT_BOUNDS, PIPELINE_VERSION, Bound, check_fields,
                                     check_number)
from xray_dist.config.choices import (AUGMENT, BURNED_IN, ENGINES, EXPORT_FORMATS, LABELS_FORMATS, METRICS, PRECISIONS,
                                      PATHS_POLICIES, PLACEMENT_STRATEGIES, SCHEDULERS, SEARCHES, TASKS,
                                      TRAIN_RUNNERS, TRIAL_RUNNERS, UNCERTAIN, Augment, BurnedIn, Engine, ExportFormat, LabelsFormat, Metric,
                                      Precision, PathsPolicy, PlacementStrategy, Scheduler, Search, Task,
                                      TrainRunner, TrialRunner, Uncertain, either)
from xray_dist.config.specs import DEFAULT_MAX_PIXELS, PrepareConfig, PreprocessSpec, stable_hash, storage_outside
from xray_dist.config.training import SweepConfig, TrainConfig
from xray_dist.config.values import check_keys, coerce, coerce_scalar, load_yaml_overrides
from xray_dist.errors import ConfigError

__all__ = [
    "BOUNDS", "COMBO_FIELDS", "ELEMENT_BOUNDS", "PIPELINE_VERSION", "Bound", "check_fields", "check_number",
    "AUGMENT", "Augment", "BURNED_IN", "ENGINES", "EXPORT_FORMATS", "LABELS_FORMATS", "METRICS", "PRECISIONS", "PATHS_POLICIES",
    "PLACEMENT_STRATEGIES", "SCHEDULERS", "SEARCHES", "TASKS", "TRAIN_RUNNERS", "TRIAL_RUNNERS", "UNCERTAIN", "BurnedIn", "Engine",
    "ExportFormat", "LabelsFormat", "Metric", "Precision", "PathsPolicy", "PlacementStrategy", "Scheduler",
    "Search", "Task", "TrainRunner", "TrialRunner", "Uncertain", "either",
    "DEFAULT_MAX_PIXELS", "PrepareConfig", "PreprocessSpec", "stable_hash", "storage_outside",
    "SweepConfig", "TrainConfig",
    "check_keys", "coerce", "coerce_scalar", "load_yaml_overrides",
    "ConfigError",
]
