"""Multi-label schemes, targets, loss and metrics (xray_dist.data.classes, xray_dist.results.metrics,
train.masked_weighted_bce) and the label formats' file matching, without Ray."""

from __future__ import annotations

import numpy as np
import pytest

from xray_dist.data.classes import (
    build_multilabel_scheme,
    build_scheme,
    finding_key,
    join_findings,
    parse_findings,
    positive_weights,
)
from xray_dist.results.metrics import Resampling, auroc, evaluate_multilabel, metrics_with_intervals


def test_finding_keys():
    assert finding_key("Pleural Effusion") == "pleural_effusion"
    assert finding_key("Support Devices") == "support_devices"
    assert finding_key(" Enlarged Cardiomediastinum ") == "enlarged_cardiomediastinum"
    assert finding_key("Lung Lesion/Mass (R)") == "lung_lesion_mass_r"


def test_cells_parse_and_join():
    assert parse_findings("Nodule|?Edema|Effusion", "normal") == (["Effusion", "Nodule"], ["Edema"])
    assert parse_findings("normal", "normal") == ([], [])
    assert join_findings(["Nodule", "Effusion"], ["Edema", "Nodule"]) == "Effusion|Nodule|?Edema"
    assert join_findings([], []) == "normal"


class TestScheme:
    labels = ["normal", "A|B", "B", "B|C", "?A", "C|?B", "normal", "B"]

    def test_the_k_most_frequent_findings(self):
        # present counts: B 4, A 1, C 2 (uncertain ones do not count)
        assert build_multilabel_scheme(self.labels, None).names == ("B", "C", "A")
        s = build_multilabel_scheme(self.labels, 1)
        assert s.names == ("B",) and s.num_outputs == 1 and s.multilabel and not s.binary

    def test_targets_mask_uncertain_and_any_finding_counts_findings_outside_k(self):
        s = build_multilabel_scheme(self.labels, 2)  # B, C
        assert s.target("A|B").tolist() == [1, 0, 1]
        assert s.target("?A").tolist() == [0, 0, -1]  # only uncertain: "any finding" unknown
        assert s.target("C|?B").tolist() == [-1, 1, 1]
        assert s.target("normal").tolist() == [0, 0, 0]
        assert build_multilabel_scheme(self.labels, 1).target("C").tolist() == [0, 1]  # C is not kept; still abnormal

    def test_refusals(self):
        with pytest.raises(ValueError, match="training split shows 3"):
            build_multilabel_scheme(self.labels, 4)
        with pytest.raises(ValueError, match="reserved"):
            build_multilabel_scheme(["Abnormal", "normal"], None)
        with pytest.raises(ValueError, match="--task multilabel"):
            build_scheme({"normal": 3, "x": 3}, 1)

    def test_positive_weights(self):
        s = build_multilabel_scheme(self.labels, None)  # B, C, A
        # B: 4 present, 3 absent, 1 uncertain; C: 2 present, 6 absent; A: 1 present, 6 absent, 1 uncertain
        assert positive_weights(s, self.labels) == pytest.approx([3 / 4, 6 / 2, 6 / 1])

    def test_round_trip(self):
        from xray_dist.data.classes import ClassScheme

        s = build_multilabel_scheme(self.labels, 2)
        assert ClassScheme.from_dict(s.to_dict()) == s
        old = {"names": ["normal", "x"], "mapping": {"normal": 0, "x": 1}, "negative": "normal"}  # before multilabel
        assert not ClassScheme.from_dict(old).multilabel


def test_masked_weighted_bce():
    """An uncertain entry (-1) contributes nothing, whatever the model says; a present finding's
    term is multiplied by its positive weight; the "any finding" column is ignored."""
    import tensorflow as tf

    from xray_dist.training.worker import masked_weighted_bce

    loss = masked_weighted_bce([3.0, 1.0])
    y = tf.constant([[1.0, -1.0, 1.0], [0.0, 1.0, 1.0]])
    a = loss(y, tf.constant([[0.8, 0.1], [0.3, 0.6]])).numpy()
    b = loss(y, tf.constant([[0.8, 0.9], [0.3, 0.6]])).numpy()  # only the masked entry changed
    np.testing.assert_allclose(a, b)
    expected = [3.0 * -np.log(0.8) / 1, (-np.log(0.7) - np.log(0.6)) / 2]
    np.testing.assert_allclose(a, expected, rtol=1e-5)


def test_multilabel_metrics_leave_uncertain_entries_out():
    rng = np.random.default_rng(0)
    n = 40
    targets = np.zeros((n, 3), dtype=int)
    targets[:, 0] = rng.integers(0, 2, n)
    targets[:, 1] = rng.integers(0, 2, n)
    targets[:5, 1] = -1
    targets[:, 2] = (targets[:, :2] == 1).any(axis=1)
    probs = np.clip(targets[:, :2] * 0.6 + rng.uniform(0, 0.5, (n, 2)), 0, 1)
    m = evaluate_multilabel(targets, probs, ["Effusion", "Pleural Effusion"])
    known = targets[:, 1] >= 0
    assert m["val_auc_per_class"]["pleural_effusion"] == pytest.approx(auroc(targets[known, 1], probs[known, 1]))
    flipped = probs.copy()
    flipped[:5, 1] = 1 - flipped[:5, 1]  # what the model says about masked entries does not count
    m2 = evaluate_multilabel(targets, flipped, ["Effusion", "Pleural Effusion"])
    assert m2["val_auc_per_class"] == m["val_auc_per_class"] and m2["val_loss"] == pytest.approx(m["val_loss"])
    assert m["val_auc_abnormal"] == pytest.approx(auroc(targets[:, 2], probs.max(axis=1)))
    assert m["val_auc_mean"] == pytest.approx(np.mean(list(m["val_auc_per_class"].values())))
    assert set(m["val_thresholds"]) == {"effusion", "pleural_effusion"}
    values, method = metrics_with_intervals(targets, probs, ["Effusion", "Pleural Effusion"], 0.5,
                                            Resampling(np.repeat(np.arange(n // 2), 2), n_boot=100),
                                            multilabel=True, thresholds=m["val_thresholds"])
    assert "patient-level" in method
    assert values["auc_pleural_effusion"][0] == pytest.approx(m["val_auc_per_class"]["pleural_effusion"])
    assert {"sensitivity_effusion", "specificity_pleural_effusion", "accuracy", "ece"} <= set(values)
    lo, hi = values["auc_abnormal"][1:]
    assert lo <= values["auc_abnormal"][0] <= hi


class TestFileMatching:
    """How a format's references find the DICOM files (no Ray: the scan alone)."""

    def touch(self, p):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")

    def test_extension_and_leading_folders_but_never_another_patients_file(self, tmp_path):
        from xray_dist.data.labels import from_chexpert

        self.touch(tmp_path / "train" / "patient00002" / "study1" / "view1_frontal.dcm")
        csv = tmp_path / "train.csv"
        csv.write_text("Path,Frontal/Lateral,AP/PA,Edema\n"
                       "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Frontal,PA,1\n"
                       "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,Frontal,PA,0\n")
        from xray_dist.data.labels import list_entries

        scan = from_chexpert(tmp_path, csv, list_entries(tmp_path), "ignore")
        assert scan.items == [("train/patient00002/study1/view1_frontal.dcm", "normal")]
        assert scan.missing == [{"path": "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
                                 "reason": "file not found"}]
        assert scan.views == {"train/patient00002/study1/view1_frontal.dcm": "PA"}

    def test_a_bad_cell_names_the_line(self, tmp_path):
        from xray_dist.errors import PrepareError
        from xray_dist.data.labels import from_chexpert

        csv = tmp_path / "train.csv"
        csv.write_text("Path,Edema\na.jpg,1\nb.jpg,maybe\n")
        with pytest.raises(PrepareError, match=r"train.csv, line 3: column 'Edema' holds 'maybe'"):
            from_chexpert(tmp_path, csv, [], "ignore")

    def test_csv_cells_with_several_findings_are_one_label(self, tmp_path):
        from xray_dist.data.labels import from_csv

        self.touch(tmp_path / "a.dcm")
        self.touch(tmp_path / "b.dcm")
        csv = tmp_path / "l.csv"
        csv.write_text("path,label\na.dcm,Nodule|Effusion\nb.dcm,Effusion|Nodule\n")
        scan = from_csv(tmp_path, csv)
        assert scan.items == [("a.dcm", "Effusion|Nodule"), ("b.dcm", "Effusion|Nodule")] and scan.multilabel
