"""The HTML report of a real run: numbers with intervals, pictures, dataset summary, nothing
identifying, and it renders with all its images in headless Chromium."""

from __future__ import annotations

import json
import re

import numpy as np
import pydicom
import pytest

pytestmark = pytest.mark.slow


def test_run_report_renders_with_its_numbers(two_worker_run, synth_binary, tmp_path, chromium):
    from PIL import Image

    from xray_dist.cli import app as cli

    _, cache, run = two_worker_run
    page = tmp_path / "report.html"
    assert cli.main(["report", str(run), "--out", str(page), "--bootstrap", "300"]) == 0
    text = page.read_text()
    m = json.loads((run / "metrics.json").read_text())
    # the AUROC point estimate is the run's, with an interval around it
    row = re.search(r"AUROC abnormal vs normal</td><td>([0-9.]+) \[([0-9.]+), ([0-9.]+)\]", text)
    point, lo, hi = map(float, row.groups())
    assert point == pytest.approx(m["val_auc_abnormal"], abs=5e-4) and lo <= point <= hi
    sens = re.search(r"sensitivity at ([0-9.]+)</td><td>([0-9.]+) \[([0-9.]+), ([0-9.]+)\]", text)
    assert float(sens.group(1)) == pytest.approx(m["best"]["threshold"], abs=5e-4)
    assert float(sens.group(2)) == pytest.approx(m["sensitivity"], abs=5e-4)
    for name in ("sensitivity at", "specificity at", "expected calibration error", "Training curves",
                 "Reliability diagram", "Confusion matrix", "ROC curves"):
        assert name in text, name
    assert text.count("data:image/png;base64,") == 4
    prep = json.loads((cache / "prepare_report.json").read_text())
    for split, v in prep["splits"].items():
        assert f"<td>{split}</td><td>{v['images']}</td><td>{v['patients']}</td>" in text
    # nothing identifying from the DICOM headers
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in synth_binary.files]
    secrets = {str(h.PatientName) for h in headers} | {h.PatientID for h in headers} | {h.PatientBirthDate for h in headers}
    assert not sorted(s for s in secrets if s in text)
    # a real browser shows it with every image decoded
    shot = tmp_path / "report.png"
    assert chromium(page, shot) == "4/4"
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10  # not a blank page


def test_dataset_section_lists_every_unused_file(tmp_path):
    from xray_dist.results.report import _dataset_section

    (tmp_path / "prepare_report.json").write_text(json.dumps({
        "found": 5, "ok": 2, "classes": {"normal": 1, "finding": 1},
        "splits": {"train": {"images": 1, "patients": 1}, "val": {"images": 1, "patients": 1}},
        "quarantined": [{"path": "a/bad.dcm", "reason": "not_dicom: no DICM prefix"},
                        {"path": "b/trunc.dcm", "reason": "truncated_pixels: 10 of 800 bytes"}],
        "unlabeled": ["c/nolabel.dcm"], "missing": ["d/gone.dcm"]}))
    html = _dataset_section(str(tmp_path), {})
    for s in ("a/bad.dcm", "no DICM prefix", "b/trunc.dcm", "truncated_pixels", "c/nolabel.dcm", "d/gone.dcm",
              "Quarantined files (unreadable; not used): 2"):
        assert s in html, s


def _hand_made_run(run, scheme, rng, n: int = 12) -> None:
    """The files of a finished run that the report reads, written as ``train`` writes them, with
    the run's macro AUROC stored as JSON null (a NaN, in standard JSON)."""
    labels = np.array([0, 1] * (n // 2))
    probs = scheme.probabilities(np.clip(labels * 0.5 + rng.uniform(0, 0.5, n), 0, 1))
    (run / "model").mkdir(parents=True)
    np.savez(run / "val_scores.npz", probs=probs, labels=labels, paths=np.array([f"v{i}.dcm" for i in range(n)]),
             patients=np.array([f"p{i // 2}" for i in range(n)]))
    (run / "metrics.json").write_text(json.dumps({
        "classes": list(scheme.names), "val_auc": None, "val_auc_abnormal": None, "best": {"threshold": 0.5},
        "epochs": 1, "best_epoch": 1, "config": {}, "dataset": {}}))
    (run / "history.csv").write_text("epoch,loss,val_loss,val_auc\n1,0.7,0.69,\n")
    (run / "model" / "model_spec.json").write_text(json.dumps({
        "model": {"image_size": 32, "num_outputs": 1, "head_width": 0, "dropout": 0.3, "unfreeze_blocks": 0},
        "classes": scheme.to_dict(), "threshold": 0.5}))


def test_a_nan_metric_is_written_as_null_and_the_report_still_renders(tmp_path):
    """A held-out split without an abnormal image has no abnormal AUROC and no sensitivity:
    ``evaluate`` writes them as JSON null (standard JSON: no bare ``NaN`` token, which strict
    readers refuse), and the report shows "n/a" there, as it does for a run's null macro AUROC."""
    from xray_dist.data.classes import ClassScheme
    from xray_dist.results.evaluate import _Split, _write, read_evaluation
    from xray_dist.results.metrics import Resampling, metrics_with_intervals
    from xray_dist.results.report import write_report

    rng = np.random.default_rng(0)
    scheme = ClassScheme(("normal", "finding"), {"normal": 0, "finding": 1})
    run = tmp_path / "run"
    _hand_made_run(run, scheme, rng)
    n = 10
    labels, patients = np.zeros(n, dtype=int), np.array([f"t{i // 2}" for i in range(n)])  # normal images only
    probs = scheme.probabilities(rng.uniform(0, 1, n))
    values, method = metrics_with_intervals(labels, probs, list(scheme.names), 0.5, Resampling(patients, n_boot=50))
    assert np.isnan(values["auc_abnormal"][0]) and np.isnan(values["sensitivity"][0])
    metrics = {"split": "test", "optimistic": False, "images": n, "patients": n // 2, "threshold": 0.5,
               "interval_method": method, **{k: {"value": v[0], "ci95": [v[1], v[2]]} for k, v in values.items()},
               "classes": list(scheme.names), "task": "multiclass"}
    out = run / "evaluation" / "test"
    out.mkdir(parents=True)
    _write(out, metrics, _Split([f"t{i}.dcm" for i in range(n)], np.zeros((n, 1, 1), np.uint8), labels, patients,
                                ["normal"] * n, {}), probs, scheme)

    text = (out / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    written = json.loads(text, parse_constant=refuse)
    assert written["auc_abnormal"] == {"value": None, "ci95": [None, None]}
    assert written["sensitivity"]["value"] is None and written["specificity"]["value"] == pytest.approx(
        values["specificity"][0])
    assert read_evaluation(str(run)) == written

    page = write_report(run, tmp_path / "report.html", n_boot=50).read_text()
    held = page[page.index("Held-out test"):page.index("Validation metrics")]
    assert "AUROC abnormal vs normal</td><td>n/a</td>" in held
    assert re.search(r"sensitivity at 0\.500</td><td>n/a</td>", held)
    assert re.search(r"specificity at 0\.500</td><td>[0-9.]+ \[", held)
    assert "macro AUROC</td><td>n/a</td>" in page[page.index("Validation metrics"):]
    assert page.count("data:image/png;base64,") == 4


def test_the_sweep_table_puts_first_the_trial_its_objective_chose(tmp_path):
    """A sweep run with --metric val_accuracy chose its best trial by accuracy: the report's table
    is sorted by that (not by AUROC, which here ranks the trials the other way) and says so."""
    import csv

    from xray_dist.results.report import _sweep_section

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    rows = [{"trial": "W0-K2-D0-lr1e-2_00000", "status": "completed", "epochs": "3", "val_auc_abnormal": "0.99",
             "val_accuracy": "0.60", "model": str(sweep / "a")},
            {"trial": "W16-K2-D0-lr1e-2_00001", "status": "completed", "epochs": "3", "val_auc_abnormal": "0.80",
             "val_accuracy": "0.90", "model": str(sweep / "b")}]
    with open(sweep / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (sweep / "best.json").write_text(json.dumps({"objective": "val_accuracy", "model": str(sweep / "b"),
                                                 "trial": rows[1]["trial"], "config": {"head_width": 16}}))
    page, _ = _sweep_section(str(sweep))
    assert page.index("W16-K2-D0-lr1e-2_00001") < page.index("W0-K2-D0-lr1e-2_00000")
    assert "Sorted by val accuracy (the sweep's objective)" in page
    (sweep / "best.json").write_text(json.dumps({"objective": "val_auc_abnormal", "model": str(sweep / "a"),
                                                 "trial": rows[0]["trial"], "config": {"head_width": 0}}))
    page, _ = _sweep_section(str(sweep))
    assert page.index("W0-K2-D0-lr1e-2_00000") < page.index("W16-K2-D0-lr1e-2_00001")
