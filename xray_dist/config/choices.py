"""Every closed set of choices, written once as a ``Literal`` type.

The configs annotate their fields with these types and check values against the tuples below; the
CLI gives the same tuples to argparse as ``choices=``. A new choice is added here and nowhere else.
"""

from __future__ import annotations

from typing import Literal, get_args

#: The labels formats prepare reads (:mod:`xray_dist.data.labels`).
LabelsFormat = Literal["csv", "nih", "chexpert", "rsna", "mimic"]
#: What an uncertain (-1) CheXpert/MIMIC finding becomes.
Uncertain = Literal["ignore", "zeros", "ones"]
#: How caches and reports name files (:mod:`xray_dist.data.paths`).
PathsPolicy = Literal["relative", "redact"]
#: What an image with burned-in annotation gets: refused or used.
BurnedIn = Literal["reject", "keep"]
#: One label per image, one sigmoid per finding, or what the cache holds.
Task = Literal["auto", "multiclass", "multilabel"]
#: What ``TrainConfig.metric`` may name: reported every epoch, for every task, higher is better (Ray
#: keeps checkpoints and Tune ranks trials by it with mode "max").
Metric = Literal["val_auc_abnormal", "val_auc", "val_accuracy"]
#: The arithmetic models compute in (:mod:`xray_dist.model.precision`); weights stay float32.
Precision = Literal["auto", "float32", "bfloat16"]
#: Input augmentation while training (:mod:`xray_dist.training.augment`).
Augment = Literal["none", "light"]
#: How Ray places a run's workers (``STRICT_SPREAD``: one per node).
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
Scheduler = Literal["asha", "fifo"]
Search = Literal["grid", "random", "optuna"]
#: auto: one-worker trials train in their Tune process; train: always Ray Train.
TrialRunner = Literal["auto", "inprocess", "train"]
#: train: Ray Train (the default: worker recovery, any number of workers); inprocess: one worker in
#: the command's own process (a local single-node try: no controller or worker process to start).
TrainRunner = Literal["train", "inprocess"]
#: Where predict scores: this process, Ray Data, or whichever suits the inputs.
Engine = Literal["auto", "local", "ray"]
#: What export writes.
ExportFormat = Literal["savedmodel", "keras"]

LABELS_FORMATS: tuple[str, ...] = get_args(LabelsFormat)
UNCERTAIN: tuple[str, ...] = get_args(Uncertain)
PATHS_POLICIES: tuple[str, ...] = get_args(PathsPolicy)
BURNED_IN: tuple[str, ...] = get_args(BurnedIn)
TASKS: tuple[str, ...] = get_args(Task)
METRICS: tuple[str, ...] = get_args(Metric)
PRECISIONS: tuple[str, ...] = get_args(Precision)
AUGMENT: tuple[str, ...] = get_args(Augment)
PLACEMENT_STRATEGIES: tuple[str, ...] = get_args(PlacementStrategy)
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)
SEARCHES: tuple[str, ...] = get_args(Search)
TRIAL_RUNNERS: tuple[str, ...] = get_args(TrialRunner)
TRAIN_RUNNERS: tuple[str, ...] = get_args(TrainRunner)
ENGINES: tuple[str, ...] = get_args(Engine)
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)


def either(values: tuple[str, ...], quote: bool = False) -> str:
    """``a, b or c`` (each as ``'a'`` with ``quote``), for messages naming what is allowed."""
    shown = [repr(v) if quote else v for v in values]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"
