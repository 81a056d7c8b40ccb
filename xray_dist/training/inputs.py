"""What a run trains, as train, tune and in-process runs all set it up: the class scheme, the
model spec and class weights (:func:`run_setup`), the train/val Ray Datasets (:func:`run_inputs`)
and the training loop's config (:func:`make_loop_config`)."""

from __future__ import annotations

from collections import Counter

from xray_dist.config import TrainConfig
from xray_dist.data.cache import load_spec, manifest_labels, read_report_summary
from xray_dist.data.classes import (ClassScheme, build_multilabel_scheme, build_scheme, is_multilabel_label,
                                    positive_weights)
from xray_dist.errors import CacheError
from xray_dist.training.pipeline import balanced_weights, fits_in_worker, split_dataset


def resolve_task(cfg: TrainConfig, labels: list[str]) -> str:
    """``multilabel`` or ``multiclass``: ``cfg.task``, or for ``auto`` what the cache says —
    multi-label when ``prepare`` read a multi-label format or any label holds several (or
    uncertain) findings."""
    if cfg.task != "auto":
        return cfg.task
    if read_report_summary(cfg.cache).get("task") == "multilabel":
        return "multilabel"
    return "multilabel" if any(is_multilabel_label(lab) for lab in labels) else "multiclass"


def run_setup(cfg: TrainConfig) -> tuple[ClassScheme, dict, dict]:
    """Class scheme, model spec and class weights for ``cfg`` (shared by train and tune)."""
    from xray_dist.model.network import ModelSpec  # imports TensorFlow

    labels = [lab for _, lab in manifest_labels(cfg.cache)]
    train_labels = [lab for _, lab in manifest_labels(cfg.cache, "train")]
    try:
        if resolve_task(cfg, labels) == "multilabel":
            scheme = build_multilabel_scheme(train_labels, cfg.num_classes, cfg.negative_class)
        else:
            scheme = build_scheme(dict(Counter(train_labels)), cfg.num_classes, cfg.negative_class)
    except ValueError as e:
        raise CacheError(f"{cfg.cache}: {e}") from None
    weights = {}
    if not scheme.multilabel:
        counts = Counter(scheme.mapping[lab] for lab in train_labels)
        weights = balanced_weights({c: counts.get(c, 0) for c in range(scheme.num_classes)})
    spec = ModelSpec(image_size=load_spec(cfg.cache).image_size, num_outputs=scheme.num_outputs,
                     head_width=cfg.head_width, dropout=cfg.dropout, unfreeze_blocks=cfg.unfreeze_blocks,
                     multilabel=scheme.multilabel)
    return scheme, spec.to_dict(), weights


def run_inputs(cfg: TrainConfig, terminal: bool = True) -> tuple[ClassScheme, dict, dict, dict]:
    """Class scheme, model spec, the train/val Ray Datasets and the training loop's config
    (``terminal``: whether the workers' lines are for the terminal; a sweep trial's are not)."""
    scheme, spec, weights = run_setup(cfg)
    train_ds, n_train = split_dataset(cfg.cache, "train", scheme, weights, cfg.features)
    val_ds, _ = split_dataset(cfg.cache, "val", scheme, weights, cfg.features)
    return scheme, spec, {"train": train_ds, "val": val_ds}, make_loop_config(cfg, scheme, spec, n_train, terminal)


def make_loop_config(cfg: TrainConfig, scheme: ClassScheme, spec: dict, n_train: int, terminal: bool = True) -> dict:
    """:func:`xray_dist.training.worker.train_loop`'s config. ``whole_split``: every worker gets
    the whole training split and takes its part of a (seed, epoch) permutation
    (:class:`~xray_dist.training.pipeline.ShardCache`) — when the split fits in
    ``worker_cache_mb``; otherwise each worker streams Ray Data's equal share."""
    pos_weight = positive_weights(scheme, [lab for _, lab in manifest_labels(cfg.cache, "train")]) \
        if scheme.multilabel else None
    return {"cfg": cfg, "scheme": scheme.to_dict(), "model_spec": spec, "n_train": n_train,
            "whole_split": fits_in_worker(cfg, spec, n_train), "pos_weight": pos_weight, "terminal": terminal}
