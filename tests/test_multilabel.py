"""Multi-label training end to end on real Ray: a cohort whose images show zero, one or two
findings at once trains K sigmoid outputs to per-finding AUROC >= 0.9; a sweep searches K; predict,
explain, evaluate, report and export all read the multi-label run (export checked apart from the
report, whose browser check skips where Chromium is missing)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from xray_dist.config import PrepareConfig, PreprocessSpec, SweepConfig, TrainConfig
from xray_dist.results.metrics import auroc

pytestmark = pytest.mark.slow

FINDINGS = ("Effusion", "Nodule")


@pytest.fixture(scope="module")
def ml_cohort(ray_cluster, tmp_path_factory):
    """48 patients × 2 images (none / Effusion / Nodule / both, every encoding in each), a
    train/val/test split at 32 px: (synth result, cache)."""
    from xray_dist.data.prepare import prepare
    from xray_dist.data.synth import synthesize_multilabel

    syn = synthesize_multilabel(tmp_path_factory.mktemp("ml_synth"), patients=48, images_per_patient=2,
                                findings=FINDINGS, size=96, seed=2)
    cache = tmp_path_factory.mktemp("ml_cache")
    report = prepare(PrepareConfig(data_dir=str(syn.out), labels=str(syn.labels_csv), out=str(cache),
                                   preprocess=PreprocessSpec(image_size=32), seed=3, test_fraction=0.2))
    assert report["task"] == "multilabel" and report["classes"] == {"Effusion": 48, "Nodule": 48, "normal": 24}
    return syn, cache


def ranked_findings(cache) -> list[str]:
    """The findings by frequency in the training split (ties alphabetical): the model's outputs.
    The split depends on the cache's random salt, so the order is read, not assumed."""
    from xray_dist.data.classes import finding_counts
    from xray_dist.data.cache import load_manifest

    m = load_manifest(cache).to_pylist()
    counts = finding_counts(r["label"] for r in m if r["split"] == "train")
    return sorted(counts, key=lambda f: (-counts[f], f))


@pytest.fixture(scope="module")
def ml_run(ml_cohort, tmp_path_factory):
    """A multi-label run (task chosen automatically from the labels), 4 epochs, all blocks trainable."""
    from xray_dist.training.driver import train

    _, cache = ml_cohort
    out = tmp_path_factory.mktemp("ml_run")
    res = train(TrainConfig(cache=str(cache), out=str(out), epochs=4, batch_size=8, lr=1e-4, weights="none",
                            unfreeze_blocks=5, num_workers=1, cpus_per_worker=0.5))
    return res, out


def test_cooccurring_findings_are_learned_per_finding(ml_cohort, ml_run):
    syn, cache = ml_cohort
    res, out = ml_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "multilabel" and m["classes"] == ranked_findings(cache) and set(m["classes"]) == set(FINDINGS)
    best = m["best"]
    assert best["val_auc_effusion"] >= 0.9 and best["val_auc_nodule"] >= 0.9
    assert best["val_auc_mean"] == pytest.approx((best["val_auc_effusion"] + best["val_auc_nodule"]) / 2)
    # any finding vs none, scored by the largest finding probability: learned too (measured 1.000)
    assert best["val_auc_abnormal"] >= 0.9
    spec = json.loads((out / "model" / "model_spec.json").read_text())
    assert spec["model"]["multilabel"] and spec["model"]["num_outputs"] == 2  # K sigmoid outputs, no softmax
    assert set(spec["thresholds"]) == {"effusion", "nodule"}
    with open(out / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert {"threshold_effusion", "threshold_nodule", "val_auc_mean"} <= set(history[0])
    # the validation scores are each finding's own probability: an image with both findings scores
    # high on both (a softmax could not)
    scores = np.load(out / "val_scores.npz")
    probs, targets = scores["probs"], scores["labels"]
    assert probs.shape[1] == 2 and targets.shape[1] == 3
    both = (targets[:, 0] == 1) & (targets[:, 1] == 1)
    assert both.any() and (probs[both] > 0.5).all(axis=1).mean() >= 0.5
    e = m["classes"].index("Effusion")
    assert auroc(targets[:, e], probs[:, e]) == pytest.approx(best["val_auc_effusion"], abs=1e-6)


def test_predict_explain_evaluate_report(ml_cohort, ml_run, tmp_path, capsys, chromium):
    from xray_dist.cli import app as cli
    from xray_dist.data.cache import load_manifest

    syn, cache = ml_cohort
    _, run = ml_run
    manifest = load_manifest(cache).to_pylist()
    test = [r for r in manifest if r["split"] == "test"]
    files = [str(syn.out / r["path"]) for r in test]

    # predict: p_<finding> per finding, the prediction is the findings over their thresholds
    assert cli.main(["predict", *files, "--model", str(run), "--out", str(tmp_path / "pred.csv")]) == 0
    with open(tmp_path / "pred.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"p_effusion", "p_nodule", "abnormal_score", "prediction"} <= set(rows[0])
    assert all(float(r["abnormal_score"]) == max(float(r["p_effusion"]), float(r["p_nodule"])) for r in rows)
    # the prediction is exactly the findings at or above their stored thresholds (sorted, as labels
    # are written); whether those thresholds, chosen on 18 validation images, also suit the test
    # images is luck of the split — the probabilities' ranking is what the model learned
    thresholds = json.loads((run / "model" / "model_spec.json").read_text())["thresholds"]
    for r in rows:
        shown = sorted(n for n in FINDINGS if float(r[f"p_{n.lower()}"]) >= thresholds[n.lower()])
        assert r["prediction"] == ("|".join(shown) or "normal"), r
    for n in FINDINGS:
        y = [n in t["label"].split("|") for t in test]
        assert auroc(np.array(y), np.array([float(r[f"p_{n.lower()}"]) for r in rows])) >= 0.75, n
    # Ray Data batch inference writes the same rows
    assert cli.main(["predict", *files[:6], "--model", str(run), "--out", str(tmp_path / "ray.csv"),
                     "--engine", "ray"]) == 0
    with open(tmp_path / "ray.csv") as f:
        by_ray = list(csv.DictReader(f))
    assert [r["prediction"] for r in by_ray] == [r["prediction"] for r in rows[:6]]
    np.testing.assert_allclose([float(r["p_nodule"]) for r in by_ray], [float(r["p_nodule"]) for r in rows[:6]],
                               atol=1e-5)

    # explain one finding, by name or by key
    # an image with both findings (from any split: the random salt decides which the test split has)
    both = next(str(syn.out / r["path"]) for r in manifest if r["label"] == "Effusion|Nodule")
    for chosen in ("Nodule", "effusion"):
        assert cli.main(["explain", both, "--model", str(run), "--out", str(tmp_path / chosen),
                         "--class", chosen]) == 0
        with open(tmp_path / chosen / "explain.csv") as f:
            (row,) = list(csv.DictReader(f))
        assert row["class"] == {"Nodule": "Nodule", "effusion": "Effusion"}[chosen] and not row["error"]
        assert np.load(next((tmp_path / chosen).glob("*.npy"))).max() == pytest.approx(1.0)
    capsys.readouterr()
    assert cli.main(["explain", both, "--model", str(run), "--out", str(tmp_path / "x"), "--class", "Edema"]) == 2
    assert f"findings are {ranked_findings(cache)}" in capsys.readouterr().err

    # evaluate: per-finding AUROC with patient-level intervals, at the stored per-finding thresholds
    assert cli.main(["evaluate", "--model", str(run), "--cache", str(cache), "--bootstrap", "200"]) == 0
    ev = json.loads((run / "evaluation" / "test" / "metrics.json").read_text())
    assert ev["task"] == "multilabel" and ev["images"] == len(test)
    assert ev["auc_effusion"]["value"] >= 0.75 and ev["auc_nodule"]["value"] >= 0.75
    assert {"sensitivity_effusion", "specificity_nodule", "auc_abnormal", "ece"} <= set(ev)
    scores = pq.read_table(run / "evaluation" / "test" / "scores.parquet").to_pandas()
    assert sorted(scores.label) == sorted(t["label"] for t in test)
    y = scores.label.str.contains("Nodule").to_numpy()
    assert ev["auc_nodule"]["value"] == pytest.approx(auroc(y, scores.p_nodule.to_numpy()))

    # report: the held-out section and the validation section name each finding
    page = tmp_path / "report.html"
    assert cli.main(["report", str(run), "--out", str(page), "--bootstrap", "200"]) == 0
    html = page.read_text()
    assert "AUROC any finding vs none" in html and "AUROC Nodule" in html and "Held-out test" in html
    assert "Confusion matrix" not in html
    marks = chromium(page, tmp_path / "report.png")
    assert marks and marks.split("/")[0] == marks.split("/")[1]  # every picture decodes


def test_export_serves_each_finding(ml_cohort, ml_run, tmp_path):
    """The serving model gives each finding's probability, as predict does (apart from the report
    test, so that it runs wherever Chromium is missing)."""
    from xray_dist.cli import app as cli
    from xray_dist.data.cache import load_split_arrays
    from xray_dist.model.artifacts import load_run_model, predict_arrays

    _, cache = ml_cohort
    _, run = ml_run
    assert cli.main(["export", "--model", str(run), "--out", str(tmp_path / "served"), "--format", "keras"]) == 0
    serving = json.loads((tmp_path / "served" / "serving.json").read_text())
    assert serving["output"]["findings"] == ranked_findings(cache) and set(serving["thresholds"]) == {"effusion", "nodule"}
    _, images = load_split_arrays(cache, "test")
    np.save(tmp_path / "x.npy", images)
    script = ("import sys, numpy as np, tf_keras as keras\nimport xray_dist.model.network\n"
              "m = keras.models.load_model(sys.argv[1])\nnp.save(sys.argv[3], m.predict(np.load(sys.argv[2]), verbose=0))")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "served" / "model.keras"), str(tmp_path / "x.npy"),
                    str(tmp_path / "y.npy")], check=True, timeout=300)
    served = np.load(tmp_path / "y.npy")
    assert served.shape == (len(images), 2)
    np.testing.assert_allclose(served, predict_arrays(load_run_model(run), images), atol=1e-5)


def test_sweep_over_the_number_of_findings(ml_cohort, tmp_path):
    """K = 1 (the most frequent finding; ties alphabetical) and K = 2 in one sweep: both complete,
    ranked by val_auc_abnormal (any finding vs none), which compares across K."""
    from xray_dist.training.tune import sweep

    _, cache = ml_cohort
    out = tmp_path / "sweep"
    base = TrainConfig(cache=str(cache), out=str(out), epochs=2, batch_size=8, lr=1e-3, weights="none",
                       num_workers=1, cpus_per_worker=0.5)
    summary = sweep(SweepConfig(base=base, out=str(out), combos=((0, 1, 0), (0, 2, 0)), lr=(1e-3, 1e-3),
                                scheduler="fifo", max_concurrent=1))
    assert summary["completed"] == 2
    with open(out / "results.csv") as f:
        rows = {int(r["num_classes"]): r for r in csv.DictReader(f)}
    assert set(rows) == {1, 2} and all(r["status"] == "completed" for r in rows.values())
    best = json.loads((out / "best.json").read_text())
    scores = {k: float(r["val_auc_abnormal"]) for k, r in rows.items()}
    assert best["config"]["num_classes"] == max(scores, key=scores.get)
    ranked = ranked_findings(cache)
    for k in (1, 2):
        m = json.loads((Path(rows[k]["model"]) / "metrics.json").read_text())
        assert m["classes"] == ranked[:k] and m["task"] == "multilabel"
        assert {f"val_auc_{f.lower()}" for f in ranked[:k]} == {key for key in m["best"] if key.startswith("val_auc_")
                                                                 and key not in ("val_auc_abnormal", "val_auc_mean")}
