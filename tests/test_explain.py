"""Grad-CAM on a real trained run: heatmap files, agreement with predict, a chosen class, bad files,
and faithfulness (hiding the hottest pixels moves the prediction more than hiding the coldest)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from xray_dist.data.cache import load_manifest
from xray_dist.errors import ModelSpecError

pytestmark = pytest.mark.slow


def val_files(cache, synth):
    m = load_manifest(cache).to_pandas()
    val = m[m.split == "val"]
    return [str(synth.out / p) for p in val.path], list(val.label)


def test_explain_writes_heatmaps_and_agrees_with_predict(two_worker_run, synth_binary, tmp_path):
    from xray_dist.cli import app as cli

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
    from xray_dist.inference.explain import explain_files

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


def brightness_model(num_outputs: int, head_width: int, size: int = 64):
    """A VGG16 model (our architecture, untrained) whose weights are set by hand so that its evidence
    is known: every conv layer passes the input's first channel straight through (centre tap 1, the
    first layer's bias undoing the BGR mean), so ``block5_conv3`` holds the local maximum brightness
    on a (size/16)² grid and the explained class's score grows with the mean of it. The right
    heatmap is therefore the brightness map: a learned model cannot promise that (at 32 px its
    block5 map is 2×2 and, trained from scratch, its maps vary between runs)."""
    from xray_dist.data.classes import ClassScheme
    from xray_dist.config import PreprocessSpec
    from xray_dist.model.network import _BGR_MEAN, ModelSpec, build_model
    from xray_dist.model.artifacts import LoadedModel

    model = build_model(ModelSpec(image_size=size, num_outputs=num_outputs, head_width=head_width), weights="none")
    base = model.get_layer("vgg16")
    for layer in base.layers:
        if layer.name.startswith("block") and "conv" in layer.name:
            kernel, bias = (np.zeros_like(w) for w in layer.get_weights())
            kernel[1, 1, 0, 0] = 1.0
            if layer.name == "block1_conv1":
                bias[0] = _BGR_MEAN[0]
            layer.set_weights([kernel, bias])
    if head_width:
        kernel, bias = (np.zeros_like(w) for w in model.get_layer("head_dense").get_weights())
        kernel[0, 0] = 1.0
        model.get_layer("head_dense").set_weights([kernel, bias])
    kernel, bias = (np.zeros_like(w) for w in model.get_layer("logits").get_weights())
    kernel[0, -1] = 0.05  # the last class (the finding) rises with brightness
    bias[-1] = -5.0
    model.get_layer("logits").set_weights([kernel, bias])
    names = ("normal", "finding") if num_outputs == 1 else tuple(f"c{i}" for i in range(num_outputs))
    return LoadedModel(model, ClassScheme(names=names), PreprocessSpec(image_size=size), 0.5)


@pytest.mark.parametrize("num_outputs,head_width", [(1, 0), (3, 8)])
def test_heatmap_is_faithful_to_the_model(num_outputs, head_width):
    """A model whose evidence is known (:func:`brightness_model`): on dark images with one bright
    square, the map peaks on the square (not on its mirror or transpose), and, the occlusion check
    of the Grad-CAM paper's sanity tests, flattening the quarter of pixels the map rates highest
    lowers the explained class's probability while flattening the lowest quarter leaves it."""
    from xray_dist.inference.explain import gradcam
    from xray_dist.model.artifacts import predict_arrays

    lm = brightness_model(num_outputs, head_width)
    rng = np.random.default_rng(0)
    cells = [(0, 3), (1, 0), (3, 2), (2, 1), (0, 1), (3, 3)]  # (row, col) of the 16 px cell, none symmetric
    images = rng.normal(40, 8, size=(len(cells), 64, 64)).clip(0, 255).astype(np.uint8)
    for img, (r, c) in zip(images, cells):
        img[16 * r + 4 : 16 * r + 12, 16 * c + 4 : 16 * c + 12] = 200
    target_class = num_outputs - 1 if num_outputs > 1 else 1  # the class that rises with brightness
    heat, target, probs = gradcam(lm, images, class_index=target_class)
    assert (target == target_class).all()
    for h, (r, c) in zip(heat, cells):
        peak = np.unravel_index(np.argmax(h), h.shape)
        assert (peak[0] // 16, peak[1] // 16) == (r, c), (peak, (r, c))
        assert h[16 * r : 16 * r + 16, 16 * c : 16 * c + 16].mean() > 3 * h.mean() / 2
    p0 = probs[:, target_class]
    drops = {}
    for name, pick in (("hot", lambda h: h >= np.quantile(h, 0.75)), ("cold", lambda h: h <= np.quantile(h, 0.25))):
        occluded = images.copy()
        for img, h in zip(occluded, heat):
            img[pick(h)] = np.uint8(np.median(img))
        drops[name] = p0 - predict_arrays(lm, occluded)[:, target_class]
    assert (drops["hot"] > 0.05).all() and (np.abs(drops["cold"]) < drops["hot"] / 5).all(), drops
    # The opposite class's evidence is the lack of brightness: its map must not light up the square.
    if num_outputs == 1:
        heat_n, _, _ = gradcam(lm, images, class_index=0)
        for h, (r, c) in zip(heat_n, cells):
            assert h[16 * r + 4 : 16 * r + 12, 16 * c + 4 : 16 * c + 12].max() < 0.5
