"""The settings of one training run (:class:`TrainConfig`, the same object on every Ray worker) and
of a sweep (:class:`SweepConfig`, whose trials are ``dataclasses.replace`` of its base)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from xray_dist.config.bounds import BOUNDS, COMBO_FIELDS, check_fields, check_number
from xray_dist.config.choices import (AUGMENT, METRICS, PRECISIONS, PLACEMENT_STRATEGIES, SCHEDULERS,
                                      SEARCHES, TASKS, TRAIN_RUNNERS, TRIAL_RUNNERS, Augment, Metric, Precision,
                                      PlacementStrategy, Scheduler, Search, Task, TrainRunner, TrialRunner, either)
from xray_dist.errors import ConfigError
from xray_dist.infra import storage
from xray_dist.infra.redaction import mask_credentials


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
        precision: ``auto``, ``float32`` or ``bfloat16`` (:mod:`xray_dist.model.precision`: auto
            trains in bf16/fp16 on GPUs and in bf16 on CPUs with AMX or AVX-512 BF16); weights
            are float32 whatever ran.
        worker_cache_mb: memory for training rows per worker. When the whole training split
            fits, every worker holds all of it (read once) and each replica trains its slice of
            every global batch of one seeded permutation per epoch (the same batches for any
            spread of the replicas): the order depends on (seed, epoch) alone, so a resumed run is
            exact (:class:`xray_dist.training.pipeline.ShardCache`). Otherwise each worker streams Ray Data's
            equal share, kept in memory after the first epoch when that fits; rank 0 keeps the
            validation set when it fits. 0 streams from Ray Data every epoch.
        shuffle_buffer: Ray Data's local shuffle buffer when a worker streams its share (the
            whole-split order above is a full permutation).
        augment: ``light`` augments training images on the fly, each from (seed, epoch, image)
            (:mod:`xray_dist.training.augment`); ``none`` (default) keeps frozen features exact.
        runner: ``train`` (Ray Train) or ``inprocess``: one worker in the command's own process,
            the same loop and checkpoints a sweep's in-process trial has, no worker recovery
            (:mod:`xray_dist.training.inprocess`); a rerun resumes with the runner it started with.
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
    task: Task = "auto"  # auto: the cache decides (xray_dist.training.inputs.resolve_task)
    unfreeze_blocks: int = 0
    weights: str = "imagenet"
    num_workers: int = 1
    gpus_per_worker: int = 0
    cpus_per_worker: float | None = None
    cpu_replicas: int = 0
    address: str | None = None
    seed: int = 0
    metric: Metric = "val_auc_abnormal"
    keep_checkpoints: int = 2
    max_failures: int = 2
    precision: Precision = "auto"
    shuffle_buffer: int = 256
    worker_cache_mb: int = 2048  # per worker: keep its training rows (and rank 0 the validation set) in memory
    placement_strategy: PlacementStrategy = "PACK"
    features: str | None = None  # set by sweeps: a frozen-feature cache to train the top on
    augment: Augment = "none"
    mlflow: str | None = None  # MLflow tracking URI (default: MLFLOW_TRACKING_URI; none: no tracking)
    runner: TrainRunner = "train"

    def __post_init__(self) -> None:
        check_fields(self)  # every number against BOUNDS
        checks = [
            (self.metric in METRICS, f"metric must be one of {', '.join(METRICS)}", "metric"),
            (self.task in TASKS, f"task must be {either(TASKS)}", "task"),
            (self.precision in PRECISIONS, f"precision must be {either(PRECISIONS)}", "precision"),
            (self.augment in AUGMENT, f"augment must be {either(AUGMENT)}", "augment"),
            (self.runner in TRAIN_RUNNERS, f"runner must be {either(TRAIN_RUNNERS)}", "runner"),
            (self.placement_strategy in PLACEMENT_STRATEGIES,
             f"placement_strategy must be {either(PLACEMENT_STRATEGIES)}", "placement_strategy"),
        ]
        for ok, msg, name in checks:
            if not ok:
                raise ConfigError(name, f"{msg}. Received: {name}={getattr(self, name)!r}")
        if self.runner == "inprocess" and (self.num_workers != 1 or self.cpu_replicas > 1):
            raise ConfigError("runner", "runner='inprocess' trains one worker in this process (on the devices it "
                                        "sees); "
                                        f"num_workers={self.num_workers}, cpu_replicas={self.cpu_replicas} need "
                                        "runner='train' (Ray Train)")
        if self.cpu_replicas and self.gpus_per_worker:
            raise ConfigError("cpu_replicas", "cpu_replicas splits the CPU when there are no GPUs; it cannot be "
                                              f"combined with gpus_per_worker={self.gpus_per_worker}. Drop one.")
        if self.features and self.augment != "none":
            raise ConfigError("augment", f"augment={self.augment!r} cannot train on frozen features: the frozen "
                                         "blocks would have to see each augmented image, and the feature cache holds "
                                         "the plain ones. Train on images (no features), or augment=none.")
        if not self.weights:
            raise ConfigError("weights", "weights must be 'imagenet', 'none' or a path to a .h5 file")

    @property
    def worker_cpus(self) -> float:
        if self.cpus_per_worker is not None:
            return self.cpus_per_worker
        return 1.0 if self.gpus_per_worker else 0.5

    def to_dict(self) -> dict[str, Any]:
        """The settings as written (config.json, metrics.json): a tracking URI's credentials masked."""
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
    scheduler: Scheduler = "asha"
    search: Search = "grid"
    max_concurrent: int | None = None
    shared_features: bool = True
    grace_period: int = 1
    resume_errored: bool = False  # a resumed sweep runs its failed trials again
    trial_runner: TrialRunner = "auto"  # auto: one-worker trials train in their Tune process; train: always Ray Train
    combos: tuple[tuple[int, int, int], ...] | None = None  # explicit (head_width, num_classes, unfreeze_blocks)

    def __post_init__(self) -> None:
        if not isinstance(self.base, TrainConfig):
            raise ConfigError("base", f"base must be a TrainConfig. Received: base={self.base!r}")
        # every number against BOUNDS; each searched value against its training field's bound
        check_fields(self, hi={"grace_period": ("epochs", self.base.epochs)})
        if self.scheduler not in SCHEDULERS:
            raise ConfigError("scheduler", f"scheduler must be {either(SCHEDULERS)}. "
                                           f"Received: scheduler={self.scheduler!r}")
        if self.search not in SEARCHES:
            raise ConfigError("search", f"search must be {either(SEARCHES)}. Received: search={self.search!r}")
        if self.combos and self.search != "grid":
            raise ConfigError("combos", f"combos lists the trials of a grid; search={self.search!r} draws its own. "
                                        "Drop --combos or use --search grid")
        if self.trial_runner not in TRIAL_RUNNERS:
            raise ConfigError("trial_runner", f"trial_runner must be {either(TRIAL_RUNNERS)}. "
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
            return tuple(check_number(n, v, int, BOUNDS[n]) for n, v in zip(COMBO_FIELDS, c))
        except ConfigError:
            raise refuse() from None
