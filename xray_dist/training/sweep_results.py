"""What a finished sweep writes: ``results.csv`` (one row per trial), ``best.json`` (the best
completed trial, whose full model is written if it trained on frozen features), ``summary.json``
and ``sweep.png`` (the metric against each searched dimension).

The file names are :mod:`xray_dist.results.runs`', which reads them. A trial's row comes from Tune's result (its reported epochs, its error) and from what the trial
wrote in ``SWEEP/trials/<trial>/`` (``config.json`` when it started, ``metrics.json`` once
exported): ``completed``, ``stopped_early`` (the scheduler ended it) or ``failed``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from xray_dist.config import SweepConfig
from xray_dist.infra import storage
from xray_dist.model.artifacts import FULL_WEIGHTS, MODEL_DIR, TOP_WEIGHTS, materialize_full_model
from xray_dist.results.runs import BEST, METRICS, RESULTS, SWEEP_PNG, write_best

#: The searched parameters of a trial.
PARAMS = ("head_width", "num_classes", "unfreeze_blocks", "lr")
FIELDS = ["trial", "head_width", "num_classes", "unfreeze_blocks", "lr", "status", "epochs", "val_auc_abnormal",
          "val_auc", "val_accuracy", "sensitivity", "specificity", "trainable_parameters", "wall_seconds", "shared_features",
          "model", "error"]


def params_of(config: dict) -> dict:
    """A trial's searched parameters from its Tune config (a grid's ``combo`` unpacked)."""
    p = dict(config)
    if "combo" in p:
        p["head_width"], p["num_classes"], p["unfreeze_blocks"] = p.pop("combo")
    return {k: p[k] for k in PARAMS}


def format_lr(lr: float) -> str:
    """A learning rate as a person writes it: ``1e-3``, ``3e-4``, ``2.5e-4``."""
    lr = float(lr)
    if lr <= 0 or not math.isfinite(lr):
        return f"{lr:g}"
    exp = math.floor(math.log10(lr))
    mant = round(lr / 10 ** exp, 6)
    if mant >= 10:  # 9.9999995e-4 rounds to 10
        mant, exp = mant / 10, exp + 1
    return f"{mant:g}e{exp}"


def settings_label(params: dict) -> str:
    """A trial's searched settings in one short token: ``W0-K2-D1-lr1e-3`` (head width, classes,
    unfrozen blocks, learning rate)."""
    p = params_of(params)
    return f"W{int(p['head_width'])}-K{int(p['num_classes'])}-D{int(p['unfreeze_blocks'])}-lr{format_lr(p['lr'])}"


def settings_text(params: dict) -> str:
    """The same settings as a sentence fragment, for summaries: ``head width 16, 2 classes, top 1
    block trainable, learning rate 1e-3``."""
    p = params_of(params)
    w, d = int(p["head_width"]), int(p["unfreeze_blocks"])
    head = "no hidden head layer" if w == 0 else f"head width {w}"
    blocks = "no VGG block trainable" if d == 0 else f"top {d} VGG block{'s' if d > 1 else ''} trainable"
    return f"{head}, {int(p['num_classes'])} classes, {blocks}, learning rate {format_lr(p['lr'])}"


def trial_name(trial) -> str:
    """A Tune trial's name and directory: its settings and its number in the sweep
    (``W0-K2-D1-lr1e-3_00001``; two trials with the same settings differ by the number)."""
    return f"{settings_label(trial.config)}_{str(trial.trial_id).rsplit('_', 1)[-1]}"


def _params_from_trial(trial_dir: str) -> dict:
    """A trial's parameters from the config it wrote when it started: Tune gives no config for a
    failed trial of a restored sweep that it does not run again."""
    try:
        c = storage.read_json(storage.join(trial_dir, "config.json"))
    except FileNotFoundError:
        return {k: "" for k in PARAMS}
    return {k: c.get(k, "") for k in PARAMS}


def _result_row(r, cfg: SweepConfig, out: str) -> dict:
    """One trial's row of ``results.csv``."""
    trial_dir = storage.join(out, "trials", Path(r.path).name)
    params = params_of(r.config) if r.config else _params_from_trial(trial_dir)
    df = r.metrics_dataframe
    row = {**params, "trial": Path(r.path).name, "status": "", "epochs": 0, "val_auc_abnormal": float("nan"),
           "val_auc": float("nan"), "val_accuracy": float("nan"), "sensitivity": float("nan"), "specificity": float("nan"),
           "trainable_parameters": "", "wall_seconds": float("nan"), "shared_features": "",
           "model": "", "error": ""}
    if df is not None and len(df) and cfg.base.metric in df:
        best = df.loc[df[cfg.base.metric].astype(float).idxmax()]
        row.update({"epochs": int(df["epoch"].max()), "val_auc_abnormal": float(best["val_auc_abnormal"]),
                    "val_auc": float(best["val_auc"]), "val_accuracy": float(best.get("val_accuracy", float("nan"))),
                    "sensitivity": float(best["sensitivity"]),
                    "specificity": float(best["specificity"]),
                    "trainable_parameters": int(best["trainable_parameters"]),
                    "wall_seconds": float(df["time_total_s"].max()) if "time_total_s" in df else float("nan")})
    if r.error:
        row["status"], row["error"] = "failed", f"{type(r.error).__name__}: {str(r.error).splitlines()[-1][:300]}"
    elif storage.is_file(storage.join(trial_dir, METRICS)):
        row["status"] = "completed"
        row["model"] = trial_dir
    else:
        row["status"] = "stopped_early"
    try:
        row["shared_features"] = bool(storage.read_json(storage.join(trial_dir, "config.json")).get("features"))
    except FileNotFoundError:
        pass
    return row


def collect_results(grid, cfg: SweepConfig, out: str) -> list[dict]:
    """Every trial's row, in trial order."""
    return sorted((_result_row(r, cfg, out) for r in grid), key=lambda r: (_trial_number(r["trial"]), r["trial"]))


def _trial_number(name: str) -> int:
    """A trial's number in its sweep (Tune's counter: ``…_00003`` in its name), -1 when it has none."""
    m = re.search(r"_(\d{5})(?:_|$)", name)
    return int(m.group(1)) if m else -1


def _write_best(best: dict, cfg: SweepConfig, out: str, finished: int) -> dict:
    """``best.json`` for the best completed trial, and its full model when it exported only its top."""
    model_dir = storage.current_dir(storage.join(best["model"], MODEL_DIR))  # a retried trial re-exports
    if storage.is_file(storage.join(model_dir, TOP_WEIGHTS)) and not storage.is_file(
            storage.join(model_dir, FULL_WEIGHTS)):
        with storage.local_copy(model_dir) as local:  # trials on frozen features exported their top only
            storage.upload_file(materialize_full_model(local), storage.join(model_dir, FULL_WEIGHTS))
    metrics = storage.read_json(storage.join(best["model"], METRICS))
    best_json = {"config": {k: best[k] for k in PARAMS},
                 "metrics": {**{k: metrics[k] for k in ("val_auc_abnormal", "val_auc", "sensitivity", "specificity",
                                                        "trainable_parameters", "epochs", "best_epoch")},
                             cfg.base.metric: best[cfg.base.metric]},
                 "model": best["model"], "trial": best["trial"], "objective": cfg.base.metric,
                 "validation_bias": f"the best of {finished} trials by validation {cfg.base.metric}: this "
                                    "validation score chose the trial, so it is biased upward; `xray-dist "
                                    "evaluate` on a held-out test split gives the number to report"}
    write_best(out, best_json)
    return best_json


def write_outputs(rows: list[dict], cfg: SweepConfig, out: str, seconds: float, features_seconds: float = 0.0) -> dict:
    """``results.csv``, ``best.json`` (removed when no trial completed), ``sweep.png`` and
    ``summary.json``; returns the summary."""
    from xray_dist.results.plots import plot_sweep  # imports matplotlib

    storage.write_csv(storage.join(out, RESULTS), rows, FIELDS)
    metric = cfg.base.metric  # what the trials were ranked by (Tune's objective): the best is chosen by it too
    finished = [r for r in rows if r["status"] == "completed" and not math.isnan(r[metric])]
    summary = {"trials": len(rows), "completed": len(finished),
               "failed": sum(r["status"] == "failed" for r in rows),
               "stopped_early": sum(r["status"] == "stopped_early" for r in rows), "seconds": round(seconds, 1),
               "features_seconds": round(features_seconds, 1)}
    if finished:
        best = max(finished, key=lambda r: r[metric])
        summary["best"] = _write_best(best, cfg, out, len(finished))
    else:  # no trial completed: an older sweep's best.json must not stay behind as if it were this one's
        storage.delete_file(storage.join(out, BEST))
    with storage.staged_file(storage.join(out, SWEEP_PNG)) as png:
        plot_sweep(rows, png, cfg.base.metric)
    storage.write_json(storage.join(out, "summary.json"), summary, indent=2, default=str)
    return summary
