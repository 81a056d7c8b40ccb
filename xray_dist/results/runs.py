"""A run's and a sweep's directory as the later stages read them: the names of the files ``train``
and ``tune`` write there, and the readers ``report``, ``evaluate`` and tracking use. No other
module of :mod:`xray_dist.results` joins paths into a run or a sweep.

Run (``RUN/``, written by ``xray-dist train``; a sweep trial is one too)::

    metrics.json            the run's summary: best and final epoch, settings, dataset counts (:data:`METRICS`)
    history.csv             one row per epoch (:data:`HISTORY`)
    val_scores.npz          the best epoch's validation probabilities, labels, image names and patient
                            keys (:data:`VAL_SCORES`)
    training_curves.png     the history, plotted (:data:`CURVES_PNG`)
    roc.png                 validation ROC curves (:data:`ROC_PNG`)
    model/                  the trained model (:mod:`xray_dist.model.artifacts`)
    inputs.json             the cache and its fingerprint (:mod:`xray_dist.data.fingerprint`)
    evaluation/<split>/     ``xray-dist evaluate``'s output (:func:`evaluation_dir`)
    mlflow.json             the MLflow run it logs to (:mod:`xray_dist.results.tracking`)

Sweep (``SWEEP/``, written by ``xray-dist tune``)::

    results.csv             one row per trial (:data:`RESULTS`)
    best.json               the best trial: its run directory, settings and metrics, and the
                            held-out test score once evaluated (:data:`BEST`)
    sweep.png               the metric against each searched dimension (:data:`SWEEP_PNG`)
    evaluation/<split>/     ``evaluate``'s output for the best trial
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray_dist.errors import XrayDistError
from xray_dist.infra import storage

METRICS = "metrics.json"
HISTORY = "history.csv"
VAL_SCORES = "val_scores.npz"
CURVES_PNG = "training_curves.png"
ROC_PNG = "roc.png"
RESULTS = "results.csv"
BEST = "best.json"
SWEEP_PNG = "sweep.png"
EVALUATION = "evaluation"


def path(directory: str | Path, name: str) -> str:
    """The file ``name`` (one of this module's names) of a run or sweep directory, local or a URI."""
    return storage.join(directory, name)


def is_run(target: str | Path) -> bool:
    """Whether ``target`` is a finished run (it has :data:`METRICS`)."""
    return storage.is_file(path(target, METRICS))


def is_sweep(target: str | Path) -> bool:
    """Whether ``target`` is a sweep (it has :data:`RESULTS`)."""
    return storage.is_file(path(target, RESULTS))


def evaluation_dir(target: str | Path, split: str) -> str:
    """Where ``evaluate`` writes its output for ``split`` of a run or sweep by default."""
    return storage.join(target, EVALUATION, split)


def _read_run_file(run: str | Path, name: str) -> bytes:
    try:
        return storage.read_bytes(path(run, name))
    except (FileNotFoundError, IsADirectoryError):
        raise XrayDistError(f"{run}: no {name}; is it a finished `xray-dist train` run or sweep trial?") from None


def read_metrics(run: str | Path) -> dict:
    """The run's :data:`METRICS` (a value that was NaN may be NaN or None, as it was written)."""
    return json.loads(_read_run_file(run, METRICS))


def read_history(run: str | Path) -> list[dict]:
    """:data:`HISTORY` as one dict of floats per epoch (an empty cell as NaN; ``epoch`` an int)."""
    reader = csv.DictReader(io.StringIO(_read_run_file(run, HISTORY).decode("utf-8"), newline=""))
    history = [{k: float(v) if v not in ("", None) else float("nan") for k, v in r.items()} for r in reader]
    for h in history:
        h["epoch"] = int(h["epoch"])
    return history


@dataclass(frozen=True)
class ValScores:
    """The best epoch's validation scores (:data:`VAL_SCORES`): ``(n, K)`` probabilities, labels
    (class indices, or multi-label target rows) and each image's salted patient key (None when the
    run recorded none, or not for every image)."""

    probs: np.ndarray
    labels: np.ndarray
    patients: np.ndarray | None


def read_val_scores(run: str | Path) -> ValScores:
    scores = np.load(io.BytesIO(_read_run_file(run, VAL_SCORES)))
    patients = scores["patients"] if "patients" in scores.files and all(scores["patients"]) else None
    return ValScores(scores["probs"], scores["labels"].astype(int), patients)


def read_results(sweep: str | Path) -> list[dict]:
    """:data:`RESULTS`: one dict of strings per trial."""
    return list(csv.DictReader(io.StringIO(storage.read_text(path(sweep, RESULTS)), newline="")))


def read_best(sweep: str | Path) -> dict | None:
    """:data:`BEST`, or None when no trial has completed."""
    try:
        return storage.read_json(path(sweep, BEST))
    except FileNotFoundError:
        return None


def write_best(sweep: str | Path, best: dict) -> None:
    """:data:`BEST`, written whole (standard JSON: NaN as null)."""
    storage.write_json(path(sweep, BEST), best, indent=2)


def read_sweep_plot(sweep: str | Path) -> bytes | None:
    """:data:`SWEEP_PNG`'s bytes, or None when the sweep has none."""
    try:
        return storage.read_bytes(path(sweep, SWEEP_PNG))
    except (FileNotFoundError, IsADirectoryError):
        return None
