"""``evaluate``: a held-out split scored once with the model's stored threshold and patient-level
intervals; refusals (train split, empty split, a re-split cache); the report's held-out section."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from xray_dist.config import PrepareConfig, PreprocessSpec, TrainConfig
from xray_dist.results.metrics import auroc, sens_spec

pytestmark = pytest.mark.slow

#: The held-out run's test AUROC must reach this (it measured 1.000 on 20 test images; one pair in
#: ten misordered is 0.9).
AUROC_FLOOR = 0.9


@pytest.fixture(scope="module")
def held_out(ray_cluster, synth_binary, tmp_path_factory):
    """A cache with train/val/test patient splits and a run trained on it: (cache, run)."""
    from xray_dist.data.prepare import prepare
    from xray_dist.training.driver import train

    cache = tmp_path_factory.mktemp("cache_test_split")
    report = prepare(PrepareConfig(data_dir=str(synth_binary.out), labels=str(synth_binary.labels_csv),
                                   out=str(cache), preprocess=PreprocessSpec(image_size=32), val_fraction=0.25,
                                   test_fraction=0.25, seed=4))
    assert report["splits"]["test"]["images"] > 0
    run = tmp_path_factory.mktemp("run_test_split")
    train(TrainConfig(cache=str(cache), out=str(run), epochs=3, batch_size=8, lr=1e-4, weights="none",
                      unfreeze_blocks=5, runner="inprocess"))  # a model to evaluate: no Ray Train needed
    return cache, run


def test_test_numbers_come_from_test_patients_only_with_the_stored_threshold(held_out, capsys):
    from xray_dist.cli import app as cli

    cache, run = held_out
    assert cli.main(["evaluate", "--model", str(run), "--cache", str(cache), "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    out = run / "evaluation" / "test"
    m = json.loads((out / "metrics.json").read_text())
    manifest = pq.read_table(cache / "manifest.parquet").to_pandas()
    test = manifest[manifest.split == "test"]
    scores = pq.read_table(out / "scores.parquet").to_pandas()
    # the test images and patients, and nothing else
    assert sorted(scores.path) == sorted(test.path) and set(scores.patient) == set(test.patient)
    assert not set(scores.patient) & set(manifest[manifest.split != "test"].patient)
    assert m["split"] == "test" and not m["optimistic"]
    assert m["images"] == len(test) and m["patients"] == test.patient.nunique()
    stored = json.loads((run / "model" / "model_spec.json").read_text())["threshold"]
    assert m["threshold"] == pytest.approx(stored)  # chosen on validation, not on test
    # the numbers are those of these scores
    y = (scores.label != "normal").to_numpy()
    p = scores.p_finding.to_numpy()
    assert m["auc_abnormal"]["value"] == pytest.approx(auroc(y, p))
    sens, spec = sens_spec(y, p, stored)
    assert m["sensitivity"]["value"] == pytest.approx(sens) and m["specificity"]["value"] == pytest.approx(spec)
    lo, hi = m["auc_abnormal"]["ci95"]
    assert lo <= m["auc_abnormal"]["value"] <= hi and "patient-level" in m["interval_method"]
    for key in ("auc_finding", "accuracy", "ece"):
        assert set(m[key]) == {"value", "ci95"}
    assert (out / "roc.png").stat().st_size > 1000 and (out / "reliability.png").stat().st_size > 1000
    assert "AUROC abnormal" in printed and f"{m['auc_abnormal']['value']:.3f}" in printed


def mann_whitney_auroc(y: list[bool], score: list[float]) -> float:
    """AUROC by its definition, written here apart from xray_dist.results.metrics: the share of
    (positive, negative) pairs the score orders correctly, a tie counting half (Mann–Whitney U
    over n_pos × n_neg)."""
    pos = [s for s, t in zip(score, y) if t]
    neg = [s for s, t in zip(score, y) if not t]
    assert pos and neg
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def test_evaluate_agrees_with_predict_on_the_test_files_and_with_an_independent_auroc(held_out, synth_binary,
                                                                                      tmp_path):
    """evaluate's rows are what ``predict`` gives for the same DICOM files (read again from disk,
    not from the cache), its AUROC is the one the test computes from those rows and the synthetic
    set's own labels, and that AUROC is a real one (the run separates the test patients)."""
    import csv

    from xray_dist.cli import app as cli
    from xray_dist.results.evaluate import evaluate_model

    cache, run = held_out
    ev = evaluate_model(str(run), str(cache), out=str(tmp_path / "ev"), n_boot=50)
    scores = pq.read_table(tmp_path / "ev" / "scores.parquet").to_pandas().set_index("path")
    files = [synth_binary.out / p for p in scores.index]
    assert len(files) == ev["images"] >= 10 and all(f.is_file() for f in files)
    assert cli.main(["predict", *map(str, files), "--model", str(run), "--out", str(tmp_path / "pred.csv"),
                     "--engine", "local"]) == 0
    with open(tmp_path / "pred.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [f.name for f in files] and not any(r["error"] for r in rows)
    for path, r in zip(scores.index, rows):  # row by row
        assert float(r["p_normal"]) == pytest.approx(scores.loc[path, "p_normal"], abs=1e-5), path
        assert float(r["p_finding"]) == pytest.approx(scores.loc[path, "p_finding"], abs=1e-5), path
        assert scores.loc[path, "label"] == synth_binary.labels[path]
    truth = [synth_binary.labels[p] != "normal" for p in scores.index]  # the generator's labels
    independent = mann_whitney_auroc(truth, [float(r["abnormal_score"]) for r in rows])
    assert ev["auc_abnormal"]["value"] == pytest.approx(independent, abs=1e-4)
    assert independent >= AUROC_FLOOR, independent


def test_validation_scores_carry_patient_keys_and_the_report_puts_test_first(held_out, tmp_path):
    from xray_dist.results.evaluate import evaluate_model
    from xray_dist.results.report import write_report

    cache, run = held_out
    evaluate_model(str(run), str(cache), n_boot=100)
    scores = np.load(run / "val_scores.npz")
    manifest = pq.read_table(cache / "manifest.parquet").to_pandas()
    val = manifest[manifest.split == "val"]
    assert dict(zip(scores["paths"], scores["patients"])) == dict(zip(val.path, val.patient))
    text = write_report(run, tmp_path / "r.html", n_boot=100).read_text()
    held, valid = text.index("Held-out test"), text.index("Validation metrics (used for selection)")
    body = text.split('<section class="card">')[0]  # the model card, at the end, names the method again
    assert held < valid and body.count("patient-level (cluster) percentile bootstrap") == 2
    assert text.count('<section class="card">') == 1


def test_val_is_marked_optimistic(held_out, tmp_path):
    from xray_dist.results.evaluate import evaluate_model

    cache, run = held_out
    m = evaluate_model(str(run), str(cache), split="val", out=str(tmp_path / "v"), n_boot=100)
    assert m["optimistic"] and "optimistic" in m["note"]


def test_refusals(held_out, two_worker_run, synth_binary, tmp_path, capsys):
    from xray_dist.cli import app as cli
    from xray_dist.data.prepare import prepare

    cache, run = held_out

    def refused(*args) -> str:
        assert cli.main(["evaluate", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        return err

    assert "split train" in refused("--model", run, "--cache", cache, "--split", "train")
    _, other_cache, other_run = two_worker_run  # a cache prepared without a test split
    assert "has no images" in refused("--model", other_run, "--cache", other_cache)
    # the same data re-split with another seed: the model's test images may now be training images
    moved = tmp_path / "resplit"
    shutil.copytree(cache, moved)
    prepare(PrepareConfig(data_dir=str(synth_binary.out), labels=str(synth_binary.labels_csv), out=str(moved),
                          preprocess=PreprocessSpec(image_size=32), val_fraction=0.25, test_fraction=0.25, seed=9))
    err = refused("--model", run, "--cache", moved)
    assert "not the cache" in err and "split" in err
    assert not (run / "evaluation" / "train").exists()


def test_external_validation_on_a_hospital_the_model_never_saw(held_out, synth_binary, ray_cluster, tmp_path,
                                                                capsys):
    """A second synthetic hospital (other seed, other site, 3 of the training patients' files
    among its own): every image scored and marked external, the shared patients counted, the
    report puts internal and external side by side; another image size and the training cache
    itself are refused."""
    from xray_dist.cli import app as cli
    from xray_dist.data.prepare import prepare
    from xray_dist.data.synth import synthesize
    from xray_dist.results.report import write_report

    cache, run = held_out
    other = synthesize(tmp_path / "other", patients=16, images_per_patient=2, size=96, seed=11, sites=3)
    with open(other.labels_csv, "a") as f:  # 3 patients who were also seen in training
        shared = sorted({pid for pid in synth_binary.patients.values()})[:3]
        for rel, pid in synth_binary.patients.items():
            if pid in shared:
                shutil.copy(synth_binary.out / rel, other.out / "images" / f"shared_{rel.split('/')[-1]}")
                f.write(f"images/shared_{rel.split('/')[-1]},{synth_binary.labels[rel]}\n")
    ext = tmp_path / "ext_cache"
    prepare(PrepareConfig(data_dir=str(other.out), labels=str(other.labels_csv), out=str(ext),
                          preprocess=PreprocessSpec(image_size=32)))
    assert cli.main(["evaluate", "--model", str(run), "--cache", str(ext), "--external", "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    outs = list((run / "evaluation").glob("external-*"))
    assert len(outs) == 1
    m = json.loads((outs[0] / "metrics.json").read_text())
    manifest = pq.read_table(ext / "manifest.parquet").to_pandas()
    scores = pq.read_table(outs[0] / "scores.parquet").to_pandas()
    assert m["external"] and m["split"] == "external" and sorted(scores.path) == sorted(manifest.path)  # every image
    assert m["images"] == 38 and m["patients"] == 19
    assert m["overlap"]["patients_in_training_cache"] == 3 and "salt" in m["overlap"]["note"]
    y, p = (scores.label != "normal").to_numpy(), scores.p_finding.to_numpy()
    pairs = [(a > b) + 0.5 * (a == b) for a in p[y] for b in p[~y]]  # AUROC by its definition
    assert m["auc_abnormal"]["value"] == pytest.approx(np.mean(pairs))
    assert "external cache (every image), 38 images of 19 patients" in printed and "training cache: 3" in printed
    assert m["training_cache_fingerprint"] != m["cache_fingerprint"]
    assert cli.main(["evaluate", "--model", str(run), "--cache", str(cache), "--bootstrap", "100"]) == 0  # internal
    page = write_report(run, tmp_path / "r.html", n_boot=100).read_text()
    assert page.index("Held-out test") < page.index("Internal and external") < page.index("External validation")
    assert f"external {m['cache_fingerprint'][:8]}" in page and "internal test" in page
    # refused: another image size (named), and the training cache passed as external
    big = tmp_path / "ext48"
    prepare(PrepareConfig(data_dir=str(other.out), labels=str(other.labels_csv), out=str(big),
                          preprocess=PreprocessSpec(image_size=48)))
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", str(run), "--cache", str(big), "--external"]) == 2
    assert "image_size 48 (the model's: 32)" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model", str(run), "--cache", str(cache), "--external"]) == 2
    assert "is the cache the model was trained with" in capsys.readouterr().err
    assert not (big / "evaluation").exists() and len(list((run / "evaluation").glob("external-*"))) == 1
