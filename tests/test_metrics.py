"""xray_dist.metrics and xray_dist.classes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from xray_dist.classes import build_scheme
from xray_dist.metrics import auroc, evaluate, sens_spec, youden_threshold


def brute_auroc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p, n in itertools.product(pos, neg)]
    return float(np.mean(pairs))


class TestAUROC:
    def test_matches_pairwise_definition_with_ties(self):
        rng = np.random.default_rng(0)
        for _ in range(20):
            y = rng.integers(0, 2, 40)
            s = np.round(rng.random(40), 1)  # many ties
            if 0 < y.sum() < 40:
                assert auroc(y, s) == pytest.approx(brute_auroc(y, s))

    def test_perfect_inverse_and_undefined(self):
        y = np.array([0, 0, 1, 1])
        assert auroc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
        assert auroc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
        assert np.isnan(auroc([1, 1], [0.2, 0.3]))


class TestThreshold:
    def test_youden_separates(self):
        y = np.array([0, 0, 0, 1, 1, 1])
        s = np.array([0.1, 0.2, 0.35, 0.4, 0.7, 0.9])
        t = youden_threshold(y, s)
        assert 0.35 < t <= 0.4
        assert sens_spec(y, s, t) == (1.0, 1.0)


class TestEvaluate:
    def test_multiclass_abnormal_from_negative(self):
        labels = np.array([0, 0, 1, 2, 2])
        probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.2, 0.2], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.5, 0.1, 0.4]])
        m = evaluate(labels, probs, ["normal", "a", "b"])
        assert m["val_auc_abnormal"] == pytest.approx(auroc(labels != 0, 1 - probs[:, 0]))
        assert m["val_auc"] == pytest.approx(np.mean([auroc(labels == c, probs[:, c]) for c in range(3)]))
        assert m["val_accuracy"] == pytest.approx(4 / 5)


class TestScheme:
    counts = {"normal": 50, "effusion": 30, "nodule": 20, "mass": 5}

    def test_all_labels_by_frequency(self):
        s = build_scheme(self.counts, None)
        assert s.names == ("normal", "effusion", "nodule", "mass") and s.num_outputs == 4

    def test_merge_least_frequent_into_other(self):
        s = build_scheme(self.counts, 3)
        assert s.names == ("normal", "effusion", "other")
        assert s.mapping == {"normal": 0, "effusion": 1, "nodule": 2, "mass": 2}

    def test_binary_is_negative_vs_rest(self):
        s = build_scheme(self.counts, 2)
        assert s.names == ("normal", "other") and s.num_outputs == 1 and set(s.mapping.values()) == {0, 1}
        assert build_scheme({"normal": 3, "finding": 2}, 2).names == ("normal", "finding")

    def test_errors(self):
        with pytest.raises(ValueError, match="negative class 'healthy'"):
            build_scheme(self.counts, None, negative="healthy")
        with pytest.raises(ValueError, match="num_classes=6"):
            build_scheme(self.counts, 6)
