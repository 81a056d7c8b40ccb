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
