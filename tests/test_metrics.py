"""xray_dist.results.metrics and xray_dist.data.classes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from xray_dist.data.classes import build_scheme
from xray_dist.results.metrics import auroc, evaluate, sens_spec, youden_threshold


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


class TestBootstrapCI:
    def test_interval_holds_the_point_and_narrows_with_more_data(self):
        from xray_dist.results.metrics import bootstrap_ci

        rng = np.random.default_rng(1)

        def sample(n):
            y = np.repeat([0, 1], n // 2)
            return y, rng.normal(y * 1.0, 1.0)

        small, large = sample(40), sample(400)
        small_ci = bootstrap_ci(auroc, small, 500, strata=small[0])
        large_ci = bootstrap_ci(auroc, large, 500, strata=large[0])
        for point, lo, hi in (small_ci, large_ci):
            assert lo <= point <= hi
        assert (large_ci[2] - large_ci[1]) < 0.6 * (small_ci[2] - small_ci[1])

    def test_coverage_is_near_nominal(self):
        """Over 100 experiments the 95 % interval covers the true AUROC of N(1,1) vs N(0,1),
        Phi(1/sqrt 2) = 0.7602, about 95 times (percentile bootstrap runs a little under)."""
        from xray_dist.results.metrics import bootstrap_ci

        rng = np.random.default_rng(7)
        y = np.repeat([0, 1], 60)
        hits = 0
        for seed in range(100):
            s = rng.normal(y * 1.0, 1.0)
            _, lo, hi = bootstrap_ci(auroc, (y, s), 300, strata=y, seed=seed)
            hits += lo <= 0.7602 <= hi
        assert 85 <= hits <= 99  # 100 of 100 would mean intervals too wide to say anything

    def test_strata_keep_a_rare_class_and_seed_repeats(self):
        from xray_dist.results.metrics import bootstrap_ci

        y = np.array([1] + [0] * 29)
        s = np.linspace(0, 1, 30)
        a = bootstrap_ci(auroc, (y, s), 200, strata=y, seed=3)
        assert not np.isnan(a[1])  # every resample still has the one positive
        assert a == bootstrap_ci(auroc, (y, s), 200, strata=y, seed=3)
        assert np.isnan(bootstrap_ci(auroc, (np.zeros(5), s[:5]), 50)[1])  # undefined stays undefined


class TestReliability:
    def test_hand_computed_ece(self):
        from xray_dist.results.metrics import reliability

        r = reliability([0, 1, 1, 1], [0.05, 0.05, 0.95, 0.85], bins=10)
        # bin 0: conf 0.05, freq 0.5 (2 images); bin 8: conf 0.85, freq 1; bin 9: conf 0.95, freq 1
        assert r["ece"] == pytest.approx((2 * 0.45 + 0.15 + 0.05) / 4)
        assert r["count"].sum() == 4 and r["count"][0] == 2

    def test_calibrated_beats_overconfident(self):
        from xray_dist.results.metrics import reliability

        rng = np.random.default_rng(0)
        p = rng.random(20000)
        y = rng.random(20000) < p
        over = np.where(p > 0.5, 1 - (1 - p) ** 3, p**3)
        assert reliability(y, p)["ece"] < 0.02 < reliability(y, over)["ece"]


def test_confusion_matrix():
    from xray_dist.results.metrics import confusion_matrix

    m = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    np.testing.assert_array_equal(m, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])


def test_patient_level_intervals_cover_the_true_auroc_and_image_level_ones_do_not():
    """Clustered scores: 60 patients × 4 images, a patient effect shared by a patient's images
    (σ 1.0) beside image noise (σ 0.5). The population AUROC is Φ(μ / √(2(σu² + σe²))). Over 200
    simulated datasets the patient-level 95 % interval covers it at least 90 % of the time; the
    image-level bootstrap, which counts a patient's 4 images as 4 independent witnesses, clearly less."""
    from math import erf, sqrt

    from xray_dist.results.metrics import bootstrap_ci, cluster_bootstrap_ci

    mu, su, se, patients, per = 1.0, 1.0, 0.5, 60, 4
    true = 0.5 * (1 + erf(mu / sqrt(2 * (su**2 + se**2)) / sqrt(2)))
    rng = np.random.default_rng(2026)
    covered = {"patient": 0, "image": 0}
    for d in range(200):
        y = (rng.random(patients) < 0.4).astype(int)
        y[:2] = [0, 1]
        labels = y.repeat(per)
        scores = mu * labels + rng.normal(0, su, patients).repeat(per) + rng.normal(0, se, patients * per)
        _, lo, hi = cluster_bootstrap_ci(auroc, (labels, scores), np.arange(patients).repeat(per), 400, seed=d,
                                         strata=labels)
        covered["patient"] += lo <= true <= hi
        _, lo, hi = bootstrap_ci(auroc, (labels, scores), 400, seed=d, strata=labels)
        covered["image"] += lo <= true <= hi
    rate = {k: v / 200 for k, v in covered.items()}
    assert rate["patient"] >= 0.90, rate
    assert rate["image"] <= 0.80 and rate["patient"] - rate["image"] >= 0.15, rate


def test_a_cluster_bootstrap_draws_whole_patients():
    from xray_dist.results.metrics import cluster_bootstrap_ci

    seen = []

    def stat(ids):
        seen.append(np.bincount(ids, minlength=6))
        return 0.0

    ids = np.array([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 5, 5])  # row index → patient
    cluster_bootstrap_ci(stat, (ids,), ids, n_boot=50)
    size = np.bincount(ids)
    for counts in seen[1:]:  # each patient drawn k times brings k × all of its rows
        assert all(c % s == 0 for c, s in zip(counts, size))
