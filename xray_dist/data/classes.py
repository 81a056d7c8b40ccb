"""Class schemes: which labels become which model outputs.

*Multi-class* (one label per image). A scheme of size K is the negative class
(``--negative-class``, default ``normal``) followed by the other labels from most to least
frequent; when K is smaller than the number of labels, the least frequent labels merge into one
class named ``other`` (K = 2 is negative vs everything else). Two classes are one sigmoid output
(probability of the second class); K > 2 are K softmax outputs.

*Multi-label* (several findings per image: NIH ChestX-ray14, CheXpert, MIMIC-CXR). A label is the
negative class (no finding) or findings joined by ``|`` — ``Effusion|Infiltration``; a finding
written ``?Edema`` is *uncertain* and masked out of that image's loss and metrics (CheXpert's
``--uncertain ignore``). A scheme of size K has K sigmoid outputs, one per finding: the K most
frequent findings in the training split (ties alphabetical). An image's target is a row of K + 1
values: per finding 1 (present), 0 (absent) or -1 (uncertain: masked), then "any finding" — 1 when
any finding is present, kept or not, 0 for the negative class, -1 when the image has only uncertain
findings. Metric and output keys use :func:`finding_key` ("Pleural Effusion" → ``pleural_effusion``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

OTHER = "other"
SEPARATOR = "|"
UNCERTAIN = "?"
#: keys that name aggregate metrics (``val_auc_abnormal``, ``val_auc_mean``): no finding may take them
_RESERVED_KEYS = {"abnormal", "mean", "per_class"}


def finding_key(name: str) -> str:
    """A finding's key in metric and column names: lowercased, every run of spaces and punctuation
    turned into one ``_`` ("Pleural Effusion" → ``pleural_effusion``, "Support Devices" →
    ``support_devices``)."""
    return re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")


def parse_findings(label: str, negative: str) -> tuple[list[str], list[str]]:
    """``(present, uncertain)`` findings of a multi-label cell (the negative class: none)."""
    if label == negative:
        return [], []
    parts = [p.strip() for p in label.split(SEPARATOR) if p.strip()]
    present = sorted({p for p in parts if not p.startswith(UNCERTAIN)})
    uncertain = sorted({p[1:].strip() for p in parts if p.startswith(UNCERTAIN)} - set(present))
    return present, uncertain


def join_findings(present, uncertain=(), negative: str = "normal") -> str:
    """The manifest's cell for an image: sorted present findings, then ``?``-marked uncertain ones;
    the negative class when there are none."""
    present = sorted(set(present))
    uncertain = sorted(set(uncertain) - set(present))
    cells = present + [UNCERTAIN + u for u in uncertain]
    return SEPARATOR.join(cells) if cells else negative


def is_multilabel_label(label: str) -> bool:
    """A cell that only a multi-label scheme can read: several findings, or an uncertain one."""
    return SEPARATOR in label or label.startswith(UNCERTAIN)


@dataclass(frozen=True)
class ClassScheme:
    names: tuple[str, ...]  # model outputs, index = output (multi-class: classes; multi-label: findings)
    mapping: dict[str, int] = field(default_factory=dict)  # multi-class: raw label -> class index
    negative: str = "normal"
    multilabel: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def num_outputs(self) -> int:
        return self.num_classes if self.multilabel else (1 if self.num_classes == 2 else self.num_classes)

    @property
    def binary(self) -> bool:
        return not self.multilabel and self.num_classes == 2

    @property
    def keys(self) -> list[str]:
        """Each output's name in metric keys and columns (``val_auc_<key>``, ``p_<key>``)."""
        return [finding_key(n) for n in self.names] if self.multilabel else list(self.names)

    def to_dict(self) -> dict:
        return {"names": list(self.names), "mapping": dict(self.mapping), "negative": self.negative,
                "multilabel": self.multilabel}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassScheme":
        return cls(names=tuple(d["names"]), mapping=dict(d["mapping"]), negative=d["negative"],
                   multilabel=bool(d.get("multilabel", False)))

    def knows(self, label: str) -> bool:
        """Whether this scheme has a target for ``label`` (multi-label: every cell has one)."""
        return self.multilabel or label in self.mapping

    def target(self, label: str) -> int | np.ndarray:
        """The training target of a manifest label: a class index, or (multi-label) the K + 1 row."""
        if not self.multilabel:
            return self.mapping[label]
        present, uncertain = parse_findings(label, self.negative)
        row = [1 if n in present else (-1 if n in uncertain else 0) for n in self.names]
        anything = 1 if present else (-1 if uncertain else 0)
        return np.asarray(row + [anything], dtype=np.int32)

    def probabilities(self, raw: np.ndarray) -> np.ndarray:
        """Model outputs → ``(n, K)``: class probabilities (one sigmoid unit ``p`` becomes
        ``[1 - p, p]``), or each finding's probability. (The same rule on TensorFlow tensors, inside
        a model: :func:`xray_dist.model.network.two_class_probabilities`.)"""
        raw = np.asarray(raw, dtype=np.float64)
        if self.multilabel:
            return raw.reshape(len(raw), -1)
        if raw.ndim == 1 or raw.shape[1] == 1:
            p = raw.reshape(-1)
            return np.stack([1.0 - p, p], axis=1)
        return raw

    def abnormal_score(self, probs: np.ndarray) -> np.ndarray:
        """The score of "abnormal" per image (:func:`abnormal_score`)."""
        return abnormal_score(probs, self.multilabel)

    def abnormal_truth(self, labels: np.ndarray) -> np.ndarray:
        """1 abnormal, 0 negative, -1 unknown, per image (:func:`abnormal_truth`)."""
        return abnormal_truth(labels, self.multilabel)


def abnormal_score(probs: np.ndarray, multilabel: bool) -> np.ndarray:
    """The score of "abnormal" from ``(n, K)`` probabilities: ``1 - p(negative)`` for classes
    (class 0 is the negative class); for findings the largest finding probability (the image is as
    abnormal as its most likely finding; a max, not a noisy-OR, because the findings co-occur
    rather than arise independently). Every abnormal AUROC, threshold, curve and prediction column
    scores this."""
    probs = np.asarray(probs, dtype=np.float64)
    if multilabel:
        return probs.max(axis=1) if probs.shape[1] else np.zeros(len(probs))
    return 1.0 - probs[:, 0]


def abnormal_truth(labels: np.ndarray, multilabel: bool) -> np.ndarray:
    """1 abnormal, 0 negative, -1 unknown, per image: a class index other than 0 (multi-class), or
    the "any finding" column of the target rows (multi-label: -1 when only uncertain findings)."""
    labels = np.asarray(labels)
    if multilabel:
        return labels[:, -1].astype(int)
    return (labels.astype(int).ravel() != 0).astype(int)


def build_scheme(label_counts: dict[str, int], num_classes: int | None, negative: str = "normal") -> ClassScheme:
    counts = Counter(label_counts)
    if negative not in counts:
        raise ValueError(f"negative class {negative!r} is not among the labels {sorted(counts)}; "
                         "set --negative-class to one of them")
    others = sorted((lab for lab in counts if lab != negative), key=lambda lab: (-counts[lab], lab))
    if not others:
        raise ValueError(f"only the negative class {negative!r} has images; training needs at least two classes")
    k = num_classes or (len(others) + 1)
    if k < 2:
        raise ValueError(f"num_classes={k}: a multi-class model needs at least 2 classes (K = 1 is a multi-label "
                         "scheme with one finding: --task multilabel)")
    if k > len(others) + 1:
        raise ValueError(f"num_classes={k} but the labels give only {len(others) + 1} classes: {[negative, *others]}")
    if k == len(others) + 1:
        kept, merged = others, []
    else:
        kept, merged = others[: k - 2], others[k - 2 :]
    names = [negative, *kept] + ([OTHER] if merged else [])
    if OTHER in kept:
        raise ValueError(f"a label is named {OTHER!r}, which clashes with the merged class; rename it")
    mapping = {negative: 0, **{lab: i + 1 for i, lab in enumerate(kept)}}
    mapping.update({lab: len(names) - 1 for lab in merged})
    return ClassScheme(names=tuple(names), mapping=mapping, negative=negative)


def finding_counts(labels, negative: str = "normal") -> Counter:
    """How many images show each finding (present, not uncertain)."""
    counts: Counter = Counter()
    for lab in labels:
        counts.update(parse_findings(lab, negative)[0])
    return counts


def build_multilabel_scheme(labels: list[str], num_classes: int | None, negative: str = "normal") -> ClassScheme:
    """The K most frequent findings of the training split's ``labels`` (None: every finding)."""
    counts = finding_counts(labels, negative)
    if not counts:
        raise ValueError("no image of the training split shows a finding; multi-label training needs at least one")
    ranked = sorted(counts, key=lambda f: (-counts[f], f))
    k = num_classes or len(ranked)
    if not 1 <= k <= len(ranked):
        raise ValueError(f"num_classes={k} findings, but the training split shows {len(ranked)}: {ranked}")
    kept = ranked[:k]
    keys = [finding_key(f) for f in kept]
    clash = sorted({k for k in keys if keys.count(k) > 1 or k in _RESERVED_KEYS or not k})
    if clash:
        raise ValueError(f"findings {[f for f in kept if finding_key(f) in clash]} give the metric keys {clash}, "
                         f"which are empty, repeated or reserved ({sorted(_RESERVED_KEYS)}); rename them")
    return ClassScheme(names=tuple(kept), mapping={}, negative=negative, multilabel=True)


def positive_weights(scheme: ClassScheme, labels: list[str]) -> list[float]:
    """Per finding ``negatives / positives`` among the training images where it is known: the
    positive weight of the weighted binary cross-entropy (a rare finding's positives count as much
    as its negatives in total)."""
    targets = np.stack([scheme.target(lab) for lab in labels])[:, : scheme.num_classes]
    pos = (targets == 1).sum(axis=0)
    neg = (targets == 0).sum(axis=0)
    return [float(n / p) if p else 1.0 for p, n in zip(pos, neg)]
