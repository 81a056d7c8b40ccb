"""Calibration (#23): a temperature fitted on validation makes an over-confident model's held-out
probabilities honest, leaves every AUROC where it was, and reaches predict, evaluate and export."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from xray_dist.model import calibration


def _pairwise_auroc(y, s) -> float:
    pos, neg = s[y == 1], s[y == 0]
    return float(np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])))


def test_the_fit_finds_the_temperature_that_made_a_model_over_confident():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, 4000)  # the true log-odds
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(int)
    over = 1 / (1 + np.exp(-3 * z))  # a model three times too sure
    t = calibration.fit(np.stack([1 - over, over], 1), y, multilabel=False)
    assert t == pytest.approx(3.0, rel=0.08)
    # findings: each its own temperature (one over-, one under-confident); an unknown entry is left out
    both = np.stack([1 / (1 + np.exp(-3 * z)), 1 / (1 + np.exp(-0.5 * z))], 1)
    targets = np.stack([y, y, y], 1)
    targets[:10, 1] = -1
    t2 = calibration.fit(both, targets, multilabel=True)
    assert t2[0] == pytest.approx(3.0, rel=0.08) and t2[1] == pytest.approx(0.5, rel=0.08)


def test_calibration_changes_no_ranking():
    """Two classes (one sigmoid, or a softmax of two) and each finding's sigmoid keep their order at
    any temperature, so AUROC cannot move. (A softmax over three or more classes would reorder
    one-vs-rest scores: calibrate refuses those models.)"""
    rng = np.random.default_rng(1)
    p = 1 / (1 + np.exp(-rng.normal(0, 2, 300)))
    y = rng.integers(0, 2, 300)
    findings = 1 / (1 + np.exp(-rng.normal(0, 2, (300, 3))))
    ys = rng.integers(0, 2, (300, 3))
    for t in (0.3, 2.5, [0.5, 1.0, 4.0]):
        if not isinstance(t, list):
            cal = calibration.apply(np.stack([1 - p, p], 1), t, multilabel=False)
            np.testing.assert_allclose(cal.sum(1), 1, atol=1e-12)
            assert _pairwise_auroc(y, cal[:, 1]) == pytest.approx(_pairwise_auroc(y, p), abs=1e-9)
        cal = calibration.apply(findings, t, multilabel=True)
        for j in range(3):
            assert _pairwise_auroc(ys[:, j], cal[:, j]) == pytest.approx(_pairwise_auroc(ys[:, j], findings[:, j]),
                                                                         abs=1e-9)
        assert not np.allclose(cal, findings)


@pytest.fixture(scope="module")
def over_confident(ray_cluster, tmp_path_factory):
    """A harder cohort (the finding at 30 % contrast) and a run trained long at a high learning
    rate: (cache, run, test images, test truth)."""
    from xray_dist.config import PrepareConfig, PreprocessSpec, TrainConfig
    from xray_dist.data.cache import load_manifest, load_split_arrays
    from xray_dist.data.prepare import prepare
    from xray_dist.data.synth import synthesize
    from xray_dist.training.driver import train

    root = tmp_path_factory.mktemp("overconfident")
    syn = synthesize(root / "data", patients=64, images_per_patient=2, size=64, seed=21, sites=1, subtle_site=0,
                     subtle_strength=0.3)
    prepare(PrepareConfig(data_dir=str(syn.out), labels=str(syn.labels_csv), out=str(root / "cache"),
                          preprocess=PreprocessSpec(image_size=32), val_fraction=0.3, test_fraction=0.3, seed=2))
    train(TrainConfig(cache=str(root / "cache"), out=str(root / "run"), epochs=12, batch_size=8, lr=1e-3,
                      weights="none", unfreeze_blocks=5, runner="inprocess"))  # a model to calibrate: no Ray Train
    paths, images = load_split_arrays(root / "cache", "test")
    label = dict(zip(*[load_manifest(root / "cache").column(c).to_pylist() for c in ("path", "label")]))
    return root / "cache", root / "run", images, np.array([label[p] != "normal" for p in paths])


@pytest.mark.slow
def test_calibrate_makes_held_out_probabilities_honest_everywhere(over_confident, tmp_path, capsys):
    import tensorflow as tf

    from xray_dist.cli import app as cli
    from xray_dist.model.artifacts import load_run_model, predict_arrays

    cache, run, images, truth = over_confident
    before_dir, after_dir = tmp_path / "before", tmp_path / "after"
    assert cli.main(["evaluate", "--model", str(run), "--cache", str(cache), "--out", str(before_dir),
                     "--bootstrap", "200", "--precision", "float32"]) == 0
    raw = predict_arrays(load_run_model(run), images)
    assert cli.main(["calibrate", "--model", str(run)]) == 0
    printed = capsys.readouterr().out
    spec = json.loads((run / "model" / "model_spec.json").read_text())
    t = spec["calibration"]["temperature"]
    assert t > 1.2, t  # trained long at a high rate: over-confident, softened
    assert "calibrate: temperature" in printed and spec["calibration"]["threshold_uncalibrated"] != spec["threshold"]
    # the calibrated probabilities, by the formula: sigmoid(logit(p) / T) of the finding's probability
    p = np.clip(raw[:, 1], 1e-7, 1 - 1e-7)
    expected = 1 / (1 + np.exp(-(np.log(p) - np.log1p(-p)) / t))
    np.testing.assert_allclose(predict_arrays(load_run_model(run), images)[:, 1], expected, atol=1e-6)

    assert cli.main(["evaluate", "--model", str(run), "--cache", str(cache), "--out", str(after_dir),
                     "--bootstrap", "200", "--precision", "float32"]) == 0
    before = json.loads((before_dir / "metrics.json").read_text())
    after = json.loads((after_dir / "metrics.json").read_text())
    assert after["auc_abnormal"]["value"] == pytest.approx(before["auc_abnormal"]["value"], abs=1e-9)
    assert after["auc_abnormal"]["value"] == pytest.approx(_pairwise_auroc(truth, expected), abs=1e-9)
    c = after["calibration"]
    assert c["ece_after"]["value"] < c["ece_before"]["value"] == pytest.approx(before["ece"]["value"])  # held out
    assert c["brier_after"]["value"] < c["brier_before"]["value"]
    assert all(len(c[k]["ci95"]) == 2 for k in ("ece_before", "ece_after", "brier_before", "brier_after"))
    assert "ECE" in capsys.readouterr().out
    from xray_dist.results.report import write_report

    (run / "evaluation").mkdir(exist_ok=True)  # the report reads RUN/evaluation/test
    import shutil

    shutil.copytree(after_dir, run / "evaluation" / "test", dirs_exist_ok=True)
    text = write_report(run, tmp_path / "report.html", n_boot=50).read_text()
    assert "<h3>Calibration</h3>" in text and f"{t:.3f}" in text

    # the exported serving model and predict's CSV give the calibrated probabilities too
    from xray_dist.data.dicom import load_image

    assert cli.main(["export", "--model", str(run), "--out", str(tmp_path / "export")]) == 0
    served = tf.saved_model.load(str(tmp_path / "export" / "savedmodel")).signatures["serving_default"]
    out = served(image=tf.constant(images))["probabilities"].numpy()
    np.testing.assert_allclose(out[:, 1], expected, atol=1e-5)
    serving = json.loads((tmp_path / "export" / "serving.json").read_text())
    assert serving["calibration"]["temperature"] == pytest.approx(t) and serving["threshold"] == spec["threshold"]
    files = sorted((cache.parent / "data" / "images").glob("*.dcm"))[:6]
    assert cli.main(["predict", "--model", str(run), *map(str, files), "--out", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    lm = load_run_model(run)
    q = np.clip(predict_arrays(lm, np.stack([load_image(str(fp), lm.preprocess) for fp in files]),
                               calibrated=False)[:, 1], 1e-7, 1 - 1e-7)
    np.testing.assert_allclose([float(r["p_finding"]) for r in rows], 1 / (1 + np.exp(-(np.log(q) - np.log1p(-q)) / t)),
                               atol=1e-5)


@pytest.mark.slow
def test_train_calibrate_temperature_calibrates_the_run_it_trained(prepared_binary, tmp_path, capsys):
    from xray_dist.cli import app as cli
    from xray_dist.results.runs import read_val_scores

    _, cache = prepared_binary
    run = tmp_path / "run"
    assert cli.main(["train", "--cache", str(cache), "--out", str(run), "--epochs", "2", "--batch-size", "8",
                     "--weights", "none", "--unfreeze-blocks", "1", "--calibrate", "temperature",
                     "--runner", "inprocess"]) == 0  # what happens once trained: any runner
    assert "calibrate: temperature" in capsys.readouterr().out
    spec = json.loads((run / "model" / "model_spec.json").read_text())
    scores = read_val_scores(run)  # the fit, redone here on the run's own validation scores
    assert spec["calibration"]["temperature"] == pytest.approx(calibration.fit(scores.probs, scores.labels, False))
    conf = tmp_path / "c.yaml"
    conf.write_text("calibrate: banana\n")
    assert cli.main(["train", "--cache", str(cache), "--out", str(tmp_path / "r2"), "--config", str(conf)]) == 2
    assert "calibrate must be none or temperature" in capsys.readouterr().err
