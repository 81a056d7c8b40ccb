"""Clinical metrics from probabilities: AUROC (macro one-vs-rest, per class, abnormal vs negative),
a threshold chosen on validation, and sensitivity/specificity at it. Plain numpy, no sklearn."""

from __future__ import annotations

import numpy as np


def auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U with midranks for ties); NaN if one class is absent."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # midranks for ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
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


def class_probabilities(raw: np.ndarray) -> np.ndarray:
    """Model outputs → ``(n, K)`` probabilities (a single sigmoid unit becomes ``[1 - p, p]``)."""
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim == 1 or raw.shape[1] == 1:
        p = raw.reshape(-1)
        return np.stack([1.0 - p, p], axis=1)
    return raw


def evaluate(labels: np.ndarray, probs: np.ndarray, names: list[str], threshold: float | None = None) -> dict:
    """All validation metrics from integer labels and ``(n, K)`` probabilities.

    ``val_auc`` is the macro mean of per-class one-vs-rest AUROCs (the positive class alone when
    K = 2); ``val_auc_abnormal`` scores "not negative" (class 0) with ``1 - p(negative)``, so runs
    with different class schemes compare on one number. Sensitivity/specificity are for
    abnormal vs negative at ``threshold`` (Youden's J on these labels when not given).
    """
    labels = np.asarray(labels).astype(int).ravel()
    k = probs.shape[1]
    per_class = {names[c]: auroc(labels == c, probs[:, c]) for c in range(k)}
    aucs = [v for v in (per_class.values() if k > 2 else [per_class[names[1]]]) if not np.isnan(v)]
    abnormal = labels != 0
    score = 1.0 - probs[:, 0]
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
