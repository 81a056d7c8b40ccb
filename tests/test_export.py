"""Serving export: reloaded in a fresh process, both formats give predict's probabilities."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from xray_dist.data.cache import load_split_arrays

pytestmark = pytest.mark.slow

LOAD_SAVEDMODEL = """
import sys, numpy as np, tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
f = m.signatures["serving_default"]
x = np.load(sys.argv[2])
np.save(sys.argv[3], f(image=tf.constant(x))["probabilities"].numpy())
assert not any(k.startswith("xray_dist") for k in sys.modules), "SavedModel needed project code"
"""

LOAD_KERAS = """
import sys, numpy as np, tf_keras as keras
import xray_dist.model.network  # registers the two custom layers
m = keras.models.load_model(sys.argv[1])
np.save(sys.argv[3], m.predict(np.load(sys.argv[2]), verbose=0))
"""


@pytest.mark.parametrize("fmt", ["savedmodel", "keras"])
def test_export_reloads_in_a_fresh_process_with_predicts_numbers(two_worker_run, tmp_path, fmt):
    from xray_dist.cli import app as cli
    from xray_dist.model.artifacts import load_run_model, predict_arrays

    _, cache, run = two_worker_run
    _, images = load_split_arrays(cache, "val")
    assert images.dtype == np.uint8 and images.ndim == 3  # the cached format the signature takes
    out = tmp_path / "served"
    assert cli.main(["export", "--model", str(run), "--out", str(out), "--format", fmt]) == 0
    serving = json.loads((out / "serving.json").read_text())
    spec = json.loads((out / "model_spec.json").read_text())
    assert serving["input"]["shape"] == [None, 32, 32] and serving["input"]["dtype"] == "uint8"
    assert serving["output"]["classes"] == spec["classes"]["names"] == ["normal", "finding"]
    assert spec["preprocess"]["image_size"] == 32
    # the threshold that travels is the run's, Youden's J on its best epoch's validation scores
    # (recomputed here: the highest score t that maximises sens + spec at "score >= t")
    assert serving["threshold"] == spec["threshold"] == json.loads((run / "model" / "model_spec.json").read_text())[
        "threshold"]
    val = np.load(run / "val_scores.npz")
    score, y = 1.0 - val["probs"][:, 0], val["labels"] != 0
    youden = max(sorted(set(score.tolist()), reverse=True),
                 key=lambda t: (score[y] >= t).mean() - (score[~y] >= t).mean())  # max keeps the first: the highest
    assert serving["threshold"] == pytest.approx(youden, abs=1e-6)
    np.save(tmp_path / "x.npy", images)
    script = LOAD_SAVEDMODEL if fmt == "savedmodel" else LOAD_KERAS
    model_path = out / ("savedmodel" if fmt == "savedmodel" else "model.keras")
    subprocess.run([sys.executable, "-c", script, str(model_path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                   check=True, timeout=300)
    served = np.load(tmp_path / "y.npy")
    expected = predict_arrays(load_run_model(run), images)
    assert served.shape == (len(images), 2)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-5)


def test_export_rejects_unknown_format_and_non_runs(two_worker_run, tmp_path):
    from xray_dist.errors import ModelSpecError
    from xray_dist.inference.export import export_model

    _, _, run = two_worker_run
    with pytest.raises(ModelSpecError, match="onnx"):
        export_model(run, tmp_path / "o", "onnx")
    with pytest.raises(ModelSpecError, match="no exported model"):
        export_model(tmp_path, tmp_path / "o")


def test_export_checks_the_model_it_wrote_in_either_precision_and_keeps_nothing_that_fails(two_worker_run, tmp_path,
                                                                                           monkeypatch, capsys):
    """export loads back what it wrote and scores seeded probe images against the run's float32
    model before keeping it: float32 within 1e-5, bfloat16 within the agreement bound. A serving
    model that computes in bfloat16 really does (its numbers differ from float32's on the cohort's
    films, within the bound), and a serving path that drifts from the run is refused with one line
    and nothing kept."""
    import tensorflow as tf

    from xray_dist.cli import app as cli
    from xray_dist.model import network
    from xray_dist.model.artifacts import load_run_model, predict_arrays
    from xray_dist.model.precision import AGREEMENT

    _, cache, run = two_worker_run
    _, films = load_split_arrays(cache, "val")
    truth = predict_arrays(load_run_model(run, "float32"), films)  # ground truth: the run's model, float32
    served = {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path / precision
        assert cli.main(["export", "--model", str(run), "--out", str(out), "--precision", precision]) == 0
        said = capsys.readouterr().out
        assert f"savedmodel in {precision}" in said and "largest probability difference" in said
        check = json.loads((out / "serving.json").read_text())["check"]
        assert check["precision"] == precision and check["images"] == 8
        assert check["max_abs_diff"] <= (1e-5 if precision == "float32" else AGREEMENT)
        serve = tf.saved_model.load(str(out / "savedmodel")).signatures["serving_default"]
        served[precision] = serve(image=tf.constant(films))["probabilities"].numpy()
    np.testing.assert_allclose(served["float32"], truth, atol=1e-5)
    bf16_gap = np.abs(served["bfloat16"] - truth).max()
    assert 0 < bf16_gap <= AGREEMENT, bf16_gap  # it computed in bfloat16, and agrees

    real_call = network.ClassProbabilities.call
    monkeypatch.setattr(network.ClassProbabilities, "call", lambda self, x: real_call(self, x) * 0.9 + 0.05)
    out = tmp_path / "drifted"
    assert cli.main(["export", "--model", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differ from the run's by" in err[0] and "nothing was written" in err[0], err
    assert not (out / "savedmodel").exists() and not (out / "serving.json").exists()
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]
