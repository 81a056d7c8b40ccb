"""Grad-CAM on a real trained run: heatmap files, agreement with predict, a chosen class, bad files,
and faithfulness (hiding the hottest pixels moves the prediction more than hiding the coldest)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from xray_dist.dataset import load_manifest, load_split_arrays
from xray_dist.errors import ModelSpecError

pytestmark = pytest.mark.slow


def val_files(cache, synth):
    m = load_manifest(cache).to_pandas()
    val = m[m.split == "val"]
    return [str(synth.out / p) for p in val.path], list(val.label)


def test_explain_writes_heatmaps_and_agrees_with_predict(two_worker_run, synth_binary, tmp_path):
    from xray_dist import cli

    _, cache, run = two_worker_run
    files, _ = val_files(cache, synth_binary)
    bad = tmp_path / "truncated.dcm"
    bad.write_bytes(open(files[0], "rb").read()[:400])  # a real header cut short
    args = ["explain", "--model", str(run), *files[:6], str(bad), "--out", str(tmp_path / "cam")]
    assert cli.main(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "cam" / "explain.csv")))
    assert len(rows) == 7
    assert rows[-1]["error"] and rows[-1]["class"] == "" and "truncated" in rows[-1]["path"]
    assert not (tmp_path / "cam" / "truncated.png").exists()
    assert cli.main(["predict", "--model", str(run), *files[:6], "--out", str(tmp_path / "p.csv")]) == 0
    preds = list(csv.DictReader(open(tmp_path / "p.csv")))
    for row, pred in zip(rows[:6], preds):
        assert row["error"] == "" and row["class"] == row["predicted"] == pred["prediction"]
        assert float(row["probability"]) == pytest.approx(float(pred[f"p_{row['class']}"]), abs=1e-5)
        heat = np.load(tmp_path / "cam" / f"{row['name']}.npy")
        assert heat.shape == (32, 32) and heat.dtype == np.float32
        assert heat.min() >= 0.0 and heat.max() <= 1.0 and heat.max() in (0.0, 1.0)
        from PIL import Image

        png = Image.open(tmp_path / "cam" / f"{row['name']}.png")
        assert png.size[0] >= 600  # legible, not a 32 px thumbnail


def test_chosen_class_and_unknown_class(two_worker_run, synth_binary, tmp_path):
    from xray_dist.explain import explain_files

    _, cache, run = two_worker_run
    files, _ = val_files(cache, synth_binary)
    rows = explain_files(run, files[:4], tmp_path / "n", class_name="normal")
    rows_f = explain_files(run, files[:4], tmp_path / "f", class_name="1")  # by index: finding
    for a, b in zip(rows, rows_f):
        assert a["class"] == "normal" and b["class"] == "finding"
        assert a["probability"] + b["probability"] == pytest.approx(1.0, abs=1e-5)
        ha, hb = np.load(tmp_path / "n" / f"{a['name']}.npy"), np.load(tmp_path / "f" / f"{b['name']}.npy")
        assert not np.allclose(ha, hb)  # opposite evidence, different maps
    with pytest.raises(ModelSpecError, match="normal"):
        explain_files(run, files[:1], tmp_path / "x", class_name="pneumothorax")


def test_heatmap_is_faithful_to_the_model(two_worker_run, synth_binary):
    """Occlusion check (as in the Grad-CAM paper's sanity tests): flattening the quarter of pixels the
    map rates highest changes the explained class's probability more, on average, than flattening
    the quarter it rates lowest."""
    from xray_dist.explain import gradcam
    from xray_dist.predict import load_run_model, predict_arrays

    _, cache, run = two_worker_run
    lm = load_run_model(run)
    _, images = load_split_arrays(cache, "val")
    heat, target, probs = gradcam(lm, images)
    p0 = probs[np.arange(len(images)), target]
    drops = {}
    for name, pick in (("hot", lambda h: h >= np.quantile(h, 0.75)), ("cold", lambda h: h <= np.quantile(h, 0.25))):
        occluded = images.copy()
        for img, h in zip(occluded, heat):
            img[pick(h)] = np.uint8(np.median(img))
        p = predict_arrays(lm, occluded)[np.arange(len(images)), target]
        drops[name] = float(np.mean(np.abs(p0 - p)))
    assert drops["hot"] > drops["cold"], drops
