"""Temperature scaling (Guo et al., 2017): one number that makes a model's probabilities honest.

A temperature ``T`` divides the model's logits before the softmax (classes: the logits are the log
probabilities, up to a constant the softmax ignores) or before each sigmoid (findings: one ``T``
per finding). ``T > 1`` softens an over-confident model, ``T < 1`` sharpens an under-confident one.
Dividing by a positive number keeps every ranking of one output, so each class's or finding's
AUROC is unchanged; it is fitted on validation by minimising the negative log-likelihood.

NumPy only: the same function calibrates arrays here (``predict``, ``evaluate``) and is written
into a serving model as a layer (:class:`xray_dist.model.network.ClassProbabilities`).
"""

from __future__ import annotations

import numpy as np

#: The range a temperature is searched in (log-spaced), wider than any model needs.
T_RANGE = (0.05, 20.0)
_EPS = 1e-7


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def apply(probs: np.ndarray, temperature, multilabel: bool) -> np.ndarray:
    """``(n, K)`` probabilities at ``temperature`` (a number; per finding, a sequence of K)."""
    probs = np.asarray(probs, dtype=np.float64)
    if multilabel:
        t = np.broadcast_to(np.asarray(temperature, dtype=np.float64), (probs.shape[1],))
        return 1 / (1 + np.exp(-_logit(probs) / t))
    return _softmax(np.log(np.clip(probs, _EPS, 1.0)) / float(temperature))


def _nll(probs: np.ndarray, y: np.ndarray, multilabel: bool) -> float:
    p = np.clip(probs, _EPS, 1 - _EPS)
    if multilabel:
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def _search(loss) -> float:
    """The temperature minimising ``loss`` on a log grid, refined around the best point."""
    lo, hi = np.log(T_RANGE[0]), np.log(T_RANGE[1])
    for _ in range(3):
        grid = np.linspace(lo, hi, 81)
        values = [loss(np.exp(g)) for g in grid]
        i = int(np.argmin(values))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    return float(np.exp(grid[i]))


def fit(probs: np.ndarray, labels: np.ndarray, multilabel: bool) -> float | list[float]:
    """The temperature that minimises the validation negative log-likelihood: one for classes
    (``labels``: class indices), one per finding (``labels``: target rows, -1 unknown, left out;
    a finding with no known entry keeps 1)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    if not multilabel:
        return _search(lambda t: _nll(apply(probs, t, False), labels, False))
    out = []
    for j in range(probs.shape[1]):
        known = labels[:, j] >= 0
        p, y = probs[known, j:j + 1], labels[known, j:j + 1]
        out.append(_search(lambda t: _nll(apply(p, t, True), y, True)) if known.any() else 1.0)
    return out


def brier(probs: np.ndarray, labels: np.ndarray, multilabel: bool) -> float:
    """Mean squared distance between the probabilities and the outcomes (known entries only)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    if multilabel:
        k = probs.shape[1]
        known = labels[:, :k] >= 0
        return float(np.mean(((probs - labels[:, :k]) ** 2)[known])) if known.any() else float("nan")
    onehot = np.eye(probs.shape[1])[labels]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))
