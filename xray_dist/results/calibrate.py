"""``calibrate``: temperature scaling of a finished run, fitted on its validation scores.

The run's best-epoch validation probabilities (``val_scores.npz``, never calibrated) fit one
temperature (one per finding, multi-label: :mod:`xray_dist.model.calibration`); the model's spec
then records it, with the threshold re-chosen (Youden's J) on the calibrated validation scores and
the uncalibrated one kept beside it. From then on ``predict``, ``evaluate`` and ``export`` give
calibrated probabilities; AUROC does not change. Fitted again, it gives the same temperature
(the validation scores it starts from are the network's own).
"""

from __future__ import annotations

import logging

import numpy as np

from xray_dist.data.classes import ClassScheme, abnormal_score, abnormal_truth
from xray_dist.errors import XrayDistError
from xray_dist.infra import storage
from xray_dist.infra.locks import TargetLock
from xray_dist.model import calibration
from xray_dist.model.artifacts import SPEC_FILE, model_dir_of, read_spec
from xray_dist.results import runs
from xray_dist.results.metrics import evaluate, reliability

log = logging.getLogger(__name__)


def _summary(labels: np.ndarray, probs: np.ndarray, scheme: ClassScheme) -> dict:
    truth, score = abnormal_truth(labels, scheme.multilabel), abnormal_score(probs, scheme.multilabel)
    known = truth >= 0
    return {"ece": reliability(truth[known], score[known])["ece"],
            "brier": calibration.brier(probs, labels, scheme.multilabel),
            **{k: v for k, v in evaluate(labels, probs, list(scheme.names), multilabel=scheme.multilabel).items()
               if k in ("val_loss", "threshold", "val_thresholds")}}


def calibrate_run(run: str) -> dict:
    """Fit the run's temperature on validation and record it in its model spec; returns the record."""
    storage.check_location(run)
    run = storage.absolute(run)
    with TargetLock(run, "xray-dist calibrate"):  # the spec is rewritten: one writer, as train's export
        model_dir = model_dir_of(run)
        spec = read_spec(model_dir)
        scheme = ClassScheme.from_dict(spec["classes"])
        if scheme.num_classes > 2 and not scheme.multilabel:
            raise XrayDistError(f"{run}: a softmax over {scheme.num_classes} classes is not calibrated: a temperature "
                                "would reorder the one-vs-rest scores and change their AUROCs (binary and "
                                "multi-label models are calibrated, their rankings kept)")
        try:
            scores = runs.read_val_scores(run)
        except FileNotFoundError:
            raise XrayDistError(f"{run}: no val_scores.npz; calibrate needs a run's validation scores") from None
        t = calibration.fit(scores.probs, scores.labels, scheme.multilabel)
        before = _summary(scores.labels, scores.probs, scheme)
        after = _summary(scores.labels, calibration.apply(scores.probs, t, scheme.multilabel), scheme)
        old = spec.get("calibration", {})
        record = {
            "method": "temperature", "fitted_on": "validation",
            "temperature": dict(zip(scheme.keys, t)) if scheme.multilabel else t,
            "threshold_uncalibrated": old.get("threshold_uncalibrated", spec.get("threshold", 0.5)),
            **({"thresholds_uncalibrated": old.get("thresholds_uncalibrated", spec.get("thresholds", {}))}
               if scheme.multilabel else {}),
            "val_nll": [before["val_loss"], after["val_loss"]], "val_ece": [before["ece"], after["ece"]],
            "val_brier": [before["brier"], after["brier"]],
        }
        spec["calibration"] = record
        spec["threshold"] = after["threshold"]
        if scheme.multilabel:
            spec["thresholds"] = after["val_thresholds"]
        storage.write_json(storage.join(model_dir, SPEC_FILE), spec, indent=2)
    log.debug("calibrate: temperature %s, validation ECE %.4f -> %.4f", t, before["ece"], after["ece"])
    return {**record, "threshold": spec["threshold"], "model_dir": model_dir}
