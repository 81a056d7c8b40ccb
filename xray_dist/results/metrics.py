"""Clinical metrics from probabilities: AUROC (macro one-vs-rest, per class, abnormal vs negative),
a threshold chosen on validation, sensitivity/specificity at it, bootstrap confidence intervals,
calibration (reliability bins, expected calibration error, the curves the plots and the report
show) and the confusion matrix. Plain numpy, no sklearn. The abnormal score and its truth are
:mod:`xray_dist.data.classes`'s (:func:`~xray_dist.data.classes.abnormal_score`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xray_dist.data.classes import abnormal_score, abnormal_truth, finding_key


def auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U with midranks for ties); NaN if one class is absent."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # midranks for ties, 1-based
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rate, true-positive rate and thresholds (descending), starting at (0, 0)."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    thr = np.unique(s)[::-1]
    tpr = np.array([0.0] + [((s >= t) & y).sum() / max(y.sum(), 1) for t in thr])
    fpr = np.array([0.0] + [((s >= t) & ~y).sum() / max((~y).sum(), 1) for t in thr])
    return fpr, tpr, np.concatenate([[np.inf], thr])


def youden_threshold(y_true: np.ndarray, score: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity − 1 (ties: the higher threshold)."""
    fpr, tpr, thr = roc_curve(y_true, score)
    j = tpr - fpr
    best = int(np.argmax(j[1:])) + 1 if len(j) > 1 else 0
    return float(thr[best]) if np.isfinite(thr[best]) else 0.5


def sens_spec(y_true: np.ndarray, score: np.ndarray, threshold: float) -> tuple[float, float]:
    y = np.asarray(y_true).astype(bool).ravel()
    pred = np.asarray(score).ravel() >= threshold
    sens = float((pred & y).sum() / y.sum()) if y.sum() else float("nan")
    spec = float((~pred & ~y).sum() / (~y).sum()) if (~y).sum() else float("nan")
    return sens, spec


def evaluate(labels: np.ndarray, probs: np.ndarray, names: list[str], threshold: float | None = None,
             multilabel: bool = False) -> dict:
    """All validation metrics from integer labels and ``(n, K)`` probabilities (multi-label:
    :func:`evaluate_multilabel`).

    ``val_auc`` is the macro mean of per-class one-vs-rest AUROCs (the positive class alone when
    K = 2); ``val_auc_abnormal`` scores "not negative" (class 0) with ``1 - p(negative)``, so runs
    with different class schemes compare on one number. Sensitivity/specificity are for
    abnormal vs negative at ``threshold`` (Youden's J on these labels when not given).
    """
    if multilabel:
        return evaluate_multilabel(labels, probs, names, threshold)
    labels = np.asarray(labels).astype(int).ravel()
    k = probs.shape[1]
    per_class = {names[c]: auroc(labels == c, probs[:, c]) for c in range(k)}
    aucs = [v for v in (per_class.values() if k > 2 else [per_class[names[1]]]) if not np.isnan(v)]
    abnormal = abnormal_truth(labels, multilabel=False)
    score = abnormal_score(probs, multilabel=False)
    thr = youden_threshold(abnormal, score) if threshold is None else threshold
    sens, spec = sens_spec(abnormal, score, thr)
    eps = 1e-7
    onehot = np.eye(k)[labels]
    loss = float(-np.mean(np.sum(onehot * np.log(np.clip(probs, eps, 1.0)), axis=1)))
    return {
        "val_loss": loss,
        "val_accuracy": float(np.mean(np.argmax(probs, axis=1) == labels)),
        "val_auc": float(np.mean(aucs)) if aucs else float("nan"),
        "val_auc_abnormal": auroc(abnormal, score),
        "val_auc_per_class": per_class,
        "threshold": thr,
        "sensitivity": sens,
        "specificity": spec,
        "val_images": int(len(labels)),
    }


def _known(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a multi-label target column that are known (not -1: uncertain, masked)."""
    keep = np.asarray(y) >= 0
    return np.asarray(y)[keep], np.asarray(s)[keep]


def _youden_or_half(y: np.ndarray, s: np.ndarray) -> float:
    return youden_threshold(y, s) if 0 < int(np.sum(y)) < len(y) else 0.5


def evaluate_multilabel(targets: np.ndarray, probs: np.ndarray, names: list[str], threshold: float | None = None,
                        thresholds: dict[str, float] | None = None) -> dict:
    """Validation metrics of a multi-label model (:mod:`xray_dist.data.classes`): ``targets`` is
    ``(n, K + 1)`` — per finding 1/0/-1 (-1: uncertain, left out), then "any finding" — and
    ``probs`` the ``(n, K)`` finding probabilities.

    Per finding: AUROC (``val_auc_per_class``, by :func:`~xray_dist.data.classes.finding_key`) and a
    Youden threshold (``val_thresholds``); ``val_auc`` and ``val_auc_mean`` are their mean.
    ``val_auc_abnormal`` is any finding (kept by the model or not) vs none, scored by the largest
    finding probability, so schemes with different K compare on it; sensitivity and specificity are
    for that score at ``threshold``. ``val_loss`` is the unweighted binary cross-entropy of the
    known entries, ``val_accuracy`` the share of known entries right at their finding's threshold.
    """
    targets = np.asarray(targets).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    keys = [finding_key(n) for n in names]
    per, thr_of, right, seen = {}, {}, 0, 0
    for j, key in enumerate(keys):
        y, s = _known(targets[:, j], probs[:, j])
        per[key] = auroc(y, s)
        thr_of[key] = thresholds[key] if thresholds and key in thresholds else _youden_or_half(y, s)
        right += int(np.sum((s >= thr_of[key]) == (y == 1)))
        seen += len(y)
    y_any, score = _known(abnormal_truth(targets, multilabel=True), abnormal_score(probs, multilabel=True))
    thr = _youden_or_half(y_any, score) if threshold is None else threshold
    sens, spec = sens_spec(y_any, score, thr)
    known = targets[:, : len(names)] >= 0
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    bce = -(np.where(targets[:, : len(names)] == 1, np.log(p), np.log(1 - p)))
    aucs = [v for v in per.values() if not np.isnan(v)]
    mean = float(np.mean(aucs)) if aucs else float("nan")
    return {
        "val_loss": float(bce[known].mean()) if known.any() else float("nan"),
        "val_accuracy": right / seen if seen else float("nan"),
        "val_auc": mean,
        "val_auc_mean": mean,
        "val_auc_abnormal": auroc(y_any, score),
        "val_auc_per_class": per,
        "val_thresholds": thr_of,
        "threshold": thr,
        "sensitivity": sens,
        "specificity": spec,
        "val_images": int(len(targets)),
    }


def bootstrap_ci(stat, arrays: tuple, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                 strata: np.ndarray | None = None) -> tuple[float, float, float]:
    """Point estimate and percentile bootstrap interval of ``stat(*arrays)`` over resampled rows.

    With ``strata`` (e.g. the labels) each resample keeps every stratum's size, so a rare class
    never vanishes from a resample and AUROC stays defined. Resamples where ``stat`` is NaN are
    dropped; the interval is NaN when fewer than half survive.
    """
    n = len(np.asarray(arrays[0]))
    return cluster_bootstrap_ci(stat, arrays, np.arange(n), n_boot, level, seed, strata)  # each row its own cluster


def cluster_bootstrap_ci(stat, arrays: tuple, clusters: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                         seed: int = 0, strata: np.ndarray | None = None) -> tuple[float, float, float]:
    """Point estimate and percentile interval of ``stat(*arrays)`` from a *cluster* bootstrap:
    each resample draws whole clusters (patients) with replacement and keeps every row of each.

    Images of one patient are correlated (same body, same scanner, usually the same label), so
    resampling images as if independent treats a patient's three images as three witnesses and
    gives intervals that are too narrow. With ``strata`` (a value per row; a cluster's stratum is
    its largest, e.g. "has any abnormal image") each resample keeps every stratum's number of
    clusters, so a rare class never vanishes. NaN resamples are dropped; the interval is NaN when
    fewer than half survive.
    """
    arrays = tuple(np.asarray(a) for a in arrays)
    point = float(stat(*arrays))
    if len(arrays[0]) == 0:
        return point, float("nan"), float("nan")
    vals = [stat(*(a[idx] for a in arrays)) for idx in cluster_resamples(clusters, n_boot, seed, strata)]
    return (point, *percentile_interval(vals, n_boot, level))


def cluster_resamples(clusters: np.ndarray, n_boot: int, seed: int = 0, strata: np.ndarray | None = None):
    """The row indices of each of ``n_boot`` cluster-bootstrap resamples (:func:`cluster_bootstrap_ci`):
    whole clusters drawn with replacement, within each stratum (a cluster's stratum is its
    largest value of ``strata``), every row of a drawn cluster kept."""
    _, which = np.unique(np.asarray(clusters), return_inverse=True)
    order = np.argsort(which, kind="stable")
    bounds = np.searchsorted(which[order], np.arange(which.max() + 2))
    members = [order[bounds[c]:bounds[c + 1]] for c in range(len(bounds) - 1)]
    if strata is not None:
        per_cluster = np.array([np.asarray(strata)[m].max() for m in members])
        groups = [np.flatnonzero(per_cluster == g) for g in np.unique(per_cluster)]
    else:
        groups = [np.arange(len(members))]
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        drawn = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        yield np.concatenate([members[c] for c in drawn])


def percentile_interval(values, n_boot: int, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap ``values`` (NaN ones dropped); NaN when fewer than
    half of the ``n_boot`` resamples gave a value."""
    vals = [v for v in values if not np.isnan(v)]
    if len(vals) < n_boot / 2:
        return float("nan"), float("nan")
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


PATIENT_METHOD = ("patient-level (cluster) percentile bootstrap: {n} resamples of patients, all images of each "
                  "drawn patient, stratified by whether the patient has an abnormal image; 95 %")
IMAGE_METHOD = ("image-level stratified percentile bootstrap: {n} resamples of images, 95 % (these scores carry "
                "no patient keys, so images of one patient count as independent and the intervals are too narrow)")


@dataclass(frozen=True)
class Resampling:
    """How :func:`metrics_with_intervals` resamples for its 95 % intervals: whole patients
    (``patients``: one key per image; :func:`cluster_bootstrap_ci`), or single images when there
    are no patient keys (:func:`bootstrap_ci`), ``n_boot`` times from ``seed``."""

    patients: np.ndarray | None = None
    n_boot: int = 1000
    seed: int = 0

    @property
    def method(self) -> str:
        """The interval method, in words (shown beside the numbers)."""
        return (PATIENT_METHOD if self.patients is not None else IMAGE_METHOD).format(n=self.n_boot)

    def interval(self, stat, arrays: tuple, patient_strata: np.ndarray, image_strata: np.ndarray):
        """``(value, lo, hi)`` of ``stat(*arrays)``: patients stratified by ``patient_strata``
        (a patient's stratum is its largest), or images by ``image_strata``."""
        if self.patients is not None:
            return cluster_bootstrap_ci(stat, arrays, self.patients, self.n_boot, seed=self.seed,
                                        strata=patient_strata)
        return bootstrap_ci(stat, arrays, self.n_boot, seed=self.seed, strata=image_strata)


def metrics_with_intervals(labels: np.ndarray, probs: np.ndarray, names: list[str], threshold: float,
                           resampling: Resampling = Resampling(), multilabel: bool = False,
                           thresholds: dict[str, float] | None = None) -> tuple[dict, str]:
    """Point estimates and 95 % intervals, ``{name: (value, lo, hi)}``, of ``auc_abnormal``,
    ``auc_<class>`` (one-vs-rest; the positive class alone for K = 2), ``sensitivity`` and
    ``specificity`` of the abnormal score at ``threshold``, ``accuracy`` (argmax) and ``ece`` (of
    the abnormal score); and the interval method, in words. ``resampling`` says whether the
    bootstrap resamples patients or images. Multi-label: :func:`_multilabel_intervals`."""
    if multilabel:
        return _multilabel_intervals(labels, probs, names, threshold, thresholds or {}, resampling), resampling.method
    labels = np.asarray(labels).astype(int)
    abnormal = abnormal_truth(labels, multilabel=False)
    score = abnormal_score(probs, multilabel=False)

    def ci(stat, arrays):
        return resampling.interval(stat, arrays, patient_strata=abnormal, image_strata=labels)

    out = {"auc_abnormal": ci(auroc, (abnormal, score))}
    for c in range(1, len(names)) if len(names) > 2 else [1]:
        out[f"auc_{names[c]}"] = ci(auroc, ((labels == c).astype(int), probs[:, c]))
    out["sensitivity"] = ci(lambda y, s: sens_spec(y, s, threshold)[0], (abnormal, score))
    out["specificity"] = ci(lambda y, s: sens_spec(y, s, threshold)[1], (abnormal, score))
    out["accuracy"] = ci(lambda y, p: float(np.mean(np.argmax(p, axis=1) == y)), (labels, probs))
    out["ece"] = ci(lambda y, s: reliability(y, s)["ece"], (abnormal, score))
    return out, resampling.method


def _multilabel_intervals(targets: np.ndarray, probs: np.ndarray, names: list[str], threshold: float,
                          thresholds: dict[str, float], resampling: Resampling) -> dict:
    """:func:`metrics_with_intervals` for findings (targets as :func:`evaluate_multilabel`'s):
    ``auc_abnormal`` (any finding vs none, largest finding probability), ``auc_<finding>``,
    ``sensitivity``/``specificity`` of the abnormal score at ``threshold``,
    ``sensitivity_<finding>``/``specificity_<finding>`` at each finding's threshold, ``accuracy``
    (known entries right at their thresholds) and ``ece`` (all known image × finding
    probabilities pooled). Uncertain entries (-1) are left out of every number."""
    targets = np.asarray(targets).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(names)
    keys = [finding_key(n) for n in names]
    score = abnormal_score(probs, multilabel=True)
    strata = (abnormal_truth(targets, multilabel=True) == 1).astype(int)
    rows = np.arange(len(targets))

    def ci(stat):
        return resampling.interval(lambda r: stat(r.astype(int)), (rows,), patient_strata=strata,
                                   image_strata=strata)

    def on_known(j, fn, col=None):
        def stat(r):
            y, s = _known(targets[r, j], (probs[r, j] if col is None else col[r]))
            return fn(y, s)
        return stat

    out = {"auc_abnormal": ci(on_known(-1, auroc, score))}
    for j, key in enumerate(keys):
        out[f"auc_{key}"] = ci(on_known(j, auroc))
    out["sensitivity"] = ci(on_known(-1, lambda y, s: sens_spec(y, s, threshold)[0], score))
    out["specificity"] = ci(on_known(-1, lambda y, s: sens_spec(y, s, threshold)[1], score))
    for j, key in enumerate(keys):
        t = float(thresholds.get(key, 0.5))
        out[f"sensitivity_{key}"] = ci(on_known(j, lambda y, s, t=t: sens_spec(y, s, t)[0]))
        out[f"specificity_{key}"] = ci(on_known(j, lambda y, s, t=t: sens_spec(y, s, t)[1]))
    thr = np.array([float(thresholds.get(key, 0.5)) for key in keys])

    def accuracy(r):
        y, p = targets[r, :k], probs[r]
        known = y >= 0
        return float(np.mean(((p >= thr) == (y == 1))[known])) if known.any() else float("nan")

    def ece(r):
        y, p = targets[r, :k], probs[r]
        known = y >= 0
        return reliability(y[known], p[known])["ece"] if known.any() else float("nan")

    out["accuracy"] = ci(accuracy)
    out["ece"] = ci(ece)
    return out


def reliability(y_true: np.ndarray, prob: np.ndarray, bins: int = 10) -> dict:
    """Calibration of ``prob`` as the probability that ``y_true`` is 1, in equal-width bins.

    Returns per-bin ``count``, mean ``confidence`` and observed ``frequency`` (NaN for empty bins)
    and ``ece``: the count-weighted mean of |frequency − confidence| (Naeini et al., 2015).
    """
    y = np.asarray(y_true).astype(float).ravel()
    p = np.clip(np.asarray(prob, dtype=np.float64).ravel(), 0.0, 1.0)
    which = np.minimum((p * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(which, weights=p, minlength=bins) / count
        freq = np.bincount(which, weights=y, minlength=bins) / count
    filled = count > 0
    ece = float(np.sum(count[filled] * np.abs(freq[filled] - conf[filled])) / max(len(p), 1))
    return {"edges": np.linspace(0, 1, bins + 1), "count": count, "confidence": conf, "frequency": freq, "ece": ece}


def calibration_curves(labels: np.ndarray, probs: np.ndarray, names: list[str], bins: int = 10,
                       multilabel: bool = False, top_label: bool = True) -> dict[str, dict]:
    """Reliability curves (:func:`reliability`) by legend name: of the abnormal score
    (:func:`~xray_dist.data.classes.abnormal_score`); with ``top_label`` and K > 2 also of the
    top-label confidence; multi-label: of every known image × finding probability (uncertain
    entries left out)."""
    if multilabel:
        known = labels[:, : len(names)] >= 0
        return {"findings (image x finding)": reliability(labels[:, : len(names)][known] == 1, probs[known], bins)}
    truth, score = abnormal_truth(labels, multilabel=False), abnormal_score(probs, multilabel=False)
    curves = {f"abnormal (1 - p({names[0]}))": reliability(truth, score, bins)}
    if top_label and len(names) > 2:
        top = np.argmax(probs, axis=1)
        curves["top-label confidence"] = reliability(top == labels, probs.max(axis=1), bins)
    return curves


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    """``(k, k)`` counts; rows are true classes, columns predicted ones."""
    m = np.zeros((k, k), dtype=int)
    np.add.at(m, (np.asarray(labels, dtype=int), np.asarray(predicted, dtype=int)), 1)
    return m
