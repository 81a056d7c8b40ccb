"""A finished run's outputs, from its best checkpoint: what ``RUN/`` holds when training ends.

``model/`` (the weights — the full model's, or a frozen-feature run's top — and the spec, with the
class scheme, preprocessing and the threshold chosen on validation), ``metrics.json``,
``history.csv``, ``val_scores.npz`` (with each image's name and salted patient key), the training
curves and ROC plots, and ``tensorboard/``. The result read may be Ray Train's or an in-process
run's (:class:`xray_dist.training.inprocess.LocalResult`): both give ``checkpoint`` (the latest)
and ``best_checkpoints``. The file names are :mod:`xray_dist.results.runs`', which reads them.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray_dist.config import TrainConfig
from xray_dist.data.cache import load_manifest, load_spec, read_report_summary
from xray_dist.data.classes import ClassScheme
from xray_dist.errors import XrayDistError
from xray_dist.infra import storage
from xray_dist.model.artifacts import FULL_WEIGHTS, MODEL_DIR, TOP_WEIGHTS, materialize_full_model, save_spec
from xray_dist.results import model_card
from xray_dist.results.runs import CURVES_PNG, HISTORY, METRICS, ROC_PNG, VAL_SCORES
from xray_dist.training.features import read_meta
from xray_dist.training.scalars import TENSORBOARD_DIR, write_tensorboard

@dataclass
class TrainResult:
    out: Path
    metrics: dict
    history: list[dict]
    scheme: ClassScheme


@dataclass
class BestEpoch:
    """What the run's best checkpoint holds, and the whole history from its latest."""

    row: dict  # the best epoch's history row
    epoch: int
    probs: np.ndarray
    labels: np.ndarray
    paths: np.ndarray | None
    history: list[dict]


def best_checkpoint(result, metric: str):
    """The kept checkpoint with the highest ``metric`` (NaN never wins), else the latest."""
    cands = [(m.get(metric), c) for c, m in (result.best_checkpoints or []) if m.get(metric) is not None]
    cands = [(v, c) for v, c in cands if not (isinstance(v, float) and math.isnan(v))]
    if cands:
        return max(cands, key=lambda vc: vc[0])[1]
    if result.checkpoint is None:
        raise XrayDistError(f"training reported no checkpoint (error: {result.error})")
    return result.checkpoint


def _read_best(result, metric: str, weights_to: Path) -> BestEpoch:
    """The best checkpoint's weights copied to ``weights_to``; its state and validation scores."""
    with best_checkpoint(result, metric).as_directory() as d:
        shutil.copy(Path(d) / "weights.h5", weights_to)
        state = storage.read_json(Path(d) / "state.json")
        with np.load(Path(d) / "val_scores.npz") as scores:
            probs, labels = scores["probs"], scores["labels"]
            paths = scores["paths"] if "paths" in scores.files else None
    with result.checkpoint.as_directory() as d:
        history = storage.read_json(Path(d) / "state.json")["history"]
    return BestEpoch(state["history"][-1], state["epoch"], probs, labels, paths, history)


def _export_model(cfg: TrainConfig, result, scheme: ClassScheme, spec: dict, model_dir: Path,
                  full_model: bool) -> BestEpoch:
    """``model/``: the best checkpoint's weights and the model's spec."""
    from xray_dist.model.network import ModelSpec  # imports TensorFlow

    model_dir.mkdir(parents=True, exist_ok=True)
    for stale in (FULL_WEIGHTS, TOP_WEIGHTS):  # a resumed run exports afresh
        (model_dir / stale).unlink(missing_ok=True)
    best = _read_best(result, cfg.metric, model_dir / (TOP_WEIGHTS if cfg.features else FULL_WEIGHTS))
    extra = {"classes": scheme.to_dict(), "preprocess": load_spec(cfg.cache).to_dict(),
             "threshold": best.row["threshold"], "epoch": best.epoch}
    if scheme.multilabel:  # each finding's own threshold, chosen on validation (the abnormal score's is "threshold")
        extra["thresholds"] = {k: best.row[f"threshold_{k}"] for k in scheme.keys}
    if cfg.features:
        # the frozen base under the trained top: the same weights source and seed as the features
        extra["top"] = {"features_shape": read_meta(cfg.features)["shape"], "weights": cfg.weights, "seed": cfg.seed}
        if cfg.weights not in ("imagenet", "none"):  # pinned by content: the file at that path may be replaced
            extra["top"]["weights_sha256"] = storage.content_sha256(cfg.weights)
    save_spec(model_dir, ModelSpec.from_dict(spec), extra)
    if cfg.features and full_model:
        materialize_full_model(model_dir)
    return best


def run_metrics(cfg: TrainConfig, scheme: ClassScheme, best: BestEpoch) -> dict:
    """``metrics.json``'s content: the final and best epochs, the headline numbers, the settings."""
    history, row = best.history, best.row
    final = history[-1]
    return {
        "final": final, "best": row, "best_epoch": best.epoch, "epochs": len(history),
        "metric": cfg.metric, "val_auc": row["val_auc"], "val_auc_abnormal": row["val_auc_abnormal"],
        "sensitivity": row["sensitivity"], "specificity": row["specificity"],
        "trainable_parameters": final["trainable_parameters"],
        "images_per_s": float(np.mean([h["images_per_s"] for h in history])),
        "classes": list(scheme.names), "task": "multilabel" if scheme.multilabel else "multiclass",
        **({"val_auc_mean": row["val_auc_mean"]} if scheme.multilabel else {}),
        "config": cfg.to_dict(), "dataset": read_report_summary(cfg.cache),
        "complete": len(history) >= cfg.epochs, "software": model_card.software(),
        "precision": _trained_precision(cfg.out),
    }


def _trained_precision(out: str) -> dict | None:
    """What the run computed in (rank 0's record: every worker resolves the same setting), and why;
    the weights are float32 whatever it was."""
    try:
        rec = storage.read_json(storage.join(out, "workers", "rank0.json"))
    except (FileNotFoundError, ValueError):
        return None
    return {"compute": rec.get("precision"), "why": rec.get("precision_why"), "weights": "float32"}


def write_metrics(out: Path, metrics: dict) -> None:
    """``metrics.json``: standard JSON, a NaN metric (an AUC with one class absent) written as null."""
    storage.write_json(Path(out) / METRICS, metrics, indent=2, default=str)


def write_history(path: Path, history: list[dict]) -> None:
    """``history.csv``: one row per epoch, ``epoch`` first, then every key in name order."""
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
    storage.write_csv(path, history, keys)


def export_run(cfg: TrainConfig, result, scheme: ClassScheme, spec: dict, out: Path,
               full_model: bool = True) -> TrainResult:
    """From a finished Ray Train result: exported model, metrics.json, history.csv, plots.

    A run trained on frozen features exports its trained top (``model/top_weights.h5``) and, with
    ``full_model``, the full model too. Sweep trials pass ``full_model=False``: the sweep writes the
    full model of its best trial only, and any other trial's is rebuilt when it is loaded.
    """
    from xray_dist.results import plots  # imports matplotlib

    out = Path(out)
    best = _export_model(cfg, result, scheme, spec, out / MODEL_DIR, full_model)
    save_scores(out / VAL_SCORES, cfg.cache, best.probs, best.labels, best.paths)
    write_history(out / HISTORY, best.history)
    metrics = run_metrics(cfg, scheme, best)
    write_metrics(out, metrics)
    plots.plot_history(best.history, out / CURVES_PNG)
    plots.plot_roc(best.labels, best.probs, list(scheme.names), out / ROC_PNG, multilabel=scheme.multilabel)
    write_tensorboard(best.history, out / TENSORBOARD_DIR)
    return TrainResult(out=out, metrics=metrics, history=best.history, scheme=scheme)


def save_scores(path: Path, cache: str, probs: np.ndarray, labels: np.ndarray, paths: np.ndarray | None) -> None:
    """``val_scores.npz``: probabilities, labels, and each image's name and salted patient key from
    the cache's manifest, so intervals can resample patients (:mod:`xray_dist.results.metrics`)."""
    extra = {}
    if paths is not None:
        m = load_manifest(cache)
        patient_of = dict(zip(m.column("path").to_pylist(), m.column("patient").to_pylist()))
        extra = {"paths": np.asarray(paths, dtype=str),
                 "patients": np.asarray([patient_of.get(str(p), "") for p in paths], dtype=str)}
    np.savez(path, probs=probs, labels=labels, **extra)
