"""``export``: a trained run → a serving model that needs no xray-dist code to run.

The serving model takes the cached-format image — ``(n, S, S)`` uint8 grayscale, exactly what
:func:`xray_dist.data.dicom.load_image` returns under the run's preprocessing spec — and returns
``(n, K)`` class probabilities (the one-unit sigmoid head expanded to ``[1 - p, p]``). The
preprocessing into VGG16's input space lives inside the model (:class:`xray_dist.model.network.VGGInput`).

Formats:

- ``savedmodel`` (default): ``DIR/savedmodel/`` with the ``serving_default`` signature
  ``image (uint8 [None, S, S]) → probabilities (float32 [None, K])``; loads with plain TensorFlow
  (``tf.saved_model.load``) and serves with TensorFlow Serving.
- ``keras``: ``DIR/model.keras`` (tf-keras format); loading needs ``xray_dist`` importable for its
  two custom layers.

Beside it: ``model_spec.json`` (architecture, class scheme, preprocessing spec, threshold) and
``serving.json`` (what the signature takes and returns, in words a serving engineer can act on).

Exporting again over an object-store ``DIR`` never leaves it without a model: the new
``savedmodel/`` is uploaded beside the old one as ``savedmodel.v<id>/`` and made current by one PUT
of ``DIR/savedmodel.current`` (``{"current": "savedmodel.v<id>"}``); the command prints the
directory that holds the model now. A local ``DIR`` gets the new directory by a rename.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from xray_dist.errors import ModelSpecError
from xray_dist.infra import storage
from xray_dist.model.artifacts import SPEC_FILE, LoadedModel, load_run_model, predict_arrays
from xray_dist.model.precision import AGREEMENT, SAME_ARITHMETIC

FORMATS = ("savedmodel", "keras")


def export_model(run: str | Path, out: str | Path, fmt: str = "savedmodel", precision: str = "float32") -> Path:
    """Write the serving model of ``run`` into ``out`` (local or URI); returns the model's path.

    ``precision``: what the serving model computes in (float32 by default: the machine that will
    serve it is unknown; ``bfloat16`` for CPUs with AMX or GPUs; ``auto``: as this machine would
    predict). Its weights are float32 either way. Before anything is moved into ``out``, the
    written model is loaded back as a server loads it and scores :func:`probe_images`; its
    probabilities must match the run's float32 model within :data:`~precision.SAME_ARITHMETIC`
    (float32) or :data:`~precision.AGREEMENT` (bfloat16), or nothing is written (``serving.json``
    records the check)."""
    if fmt not in FORMATS:
        raise ModelSpecError(f"--format must be one of {FORMATS}. Received: format={fmt!r}")
    storage.check_location(out)
    lm = load_run_model(run, precision)
    reference = lm if lm.precision == "float32" else load_run_model(run, "float32")
    probe = probe_images(lm.preprocess.image_size)
    expected = predict_arrays(reference, probe)
    dest = out
    # savedmodel/ is replaced whole: renamed in locally; on object storage uploaded beside the old one
    # and switched to by its pointer (storage.staged_output), so a failed re-export leaves the old one
    with storage.staged_output(dest, replace=("savedmodel",)) as out:
        path = _write(lm, fmt, out)
        check = _check(path, fmt, probe, expected, lm.precision)
        _describe(lm, fmt, path, out, check)
    if storage.is_uri(dest):
        return storage.current_dir(storage.join(dest, path.name))  # savedmodel.v<id> after a re-export
    return Path(storage.absolute(dest)) / path.name


def probe_images(size: int, n: int = 8) -> np.ndarray:
    """``(n, size, size)`` uint8 images that export's check scores: half smooth gradients and
    discs at several brightnesses (film-like), half seeded noise over the whole 0–255 range; the
    same images on every machine."""
    rng = np.random.default_rng(20261201)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    smooth = []
    for k in range(n - n // 2):
        disc = ((yy - 0.3 - 0.1 * k) ** 2 + (xx - 0.5) ** 2 < 0.04).astype(float)
        smooth.append(np.clip(0.15 + 0.5 * yy * (k + 1) / (n // 2 + 1) + 0.3 * disc, 0, 1) * 255)
    noise = rng.integers(0, 256, (n // 2, size, size))
    return np.concatenate([np.rint(np.stack(smooth)), noise]).astype(np.uint8)


def _check(path: Path, fmt: str, probe: np.ndarray, expected: np.ndarray, precision: str) -> dict:
    """The written model, loaded as a server would (plain TensorFlow for a SavedModel), scores the
    probe; its largest difference from the run's float32 model must stay within the bound."""
    import tensorflow as tf

    if fmt == "savedmodel":
        serve = tf.saved_model.load(str(path)).signatures["serving_default"]
        got = serve(image=tf.constant(probe))["probabilities"].numpy()
    else:
        import tf_keras as keras

        got = np.asarray(keras.models.load_model(str(path), compile=False)(probe, training=False))
    bound = SAME_ARITHMETIC if precision == "float32" else AGREEMENT
    diff = float(np.abs(got.astype(np.float64) - expected).max()) if got.shape == expected.shape else float("inf")
    if not diff <= bound:
        raise ModelSpecError(f"export: the exported model's probabilities differ from the run's by {diff:.3g} on the "
                             f"probe images (bound {bound:g} in {precision}); nothing was written")
    return {"images": len(probe), "precision": precision, "max_abs_diff": diff, "bound": bound,
            "against": "the run's model in float32, on export.probe_images (seeded film-like images and noise)"}


def _write(lm: LoadedModel, fmt: str, out: Path) -> Path:
    # TensorFlow: only when exporting (the model is loaded already)
    import tensorflow as tf
    import tf_keras as keras

    from xray_dist.model.network import ClassProbabilities

    size = lm.preprocess.image_size
    image = keras.Input((size, size), dtype="uint8", name="image")
    probabilities = ClassProbabilities(multilabel=lm.scheme.multilabel, temperature=lm.temperature,
                                       name="probabilities")
    serving = keras.Model(image, probabilities(lm.model(image, training=False)),
                          name="xray_vgg16_serving")
    if fmt == "savedmodel":
        path = out / "savedmodel"
        if path.exists():
            shutil.rmtree(path)

        @tf.function(input_signature=[tf.TensorSpec([None, size, size], tf.uint8, name="image")])
        def serve(image):
            return {"probabilities": serving(image, training=False)}

        module = tf.Module()
        module.model = serving
        module.serve = serve
        tf.saved_model.save(module, str(path), signatures={"serving_default": serve})
    else:
        path = out / "model.keras"
        serving.save(str(path))
    return path


def _describe(lm: LoadedModel, fmt: str, path: Path, out: Path, check: dict) -> None:
    spec, size = lm.spec, lm.preprocess.image_size
    storage.write_json(out / SPEC_FILE, spec, indent=2)
    storage.write_json(out / "serving.json", {
        "format": fmt,
        "model": path.name,
        "input": {"name": "image", "dtype": "uint8", "shape": [None, size, size],
                  "meaning": "grayscale radiograph after the preprocessing spec (0 = black), as in the cache"},
        "output": {"name": "probabilities", "dtype": "float32", "shape": [None, lm.scheme.num_classes],
                   **({"findings": list(lm.scheme.names), "keys": lm.scheme.keys,
                       "meaning": "each finding's probability (independent sigmoids; several can be present)"}
                      if lm.scheme.multilabel else {"classes": list(lm.scheme.names)})},
        "abnormal_score": ("max(probabilities, axis=1) (any finding: the most probable one)" if lm.scheme.multilabel
                           else f"1 - probabilities[:, 0] (class 0 is {lm.scheme.names[0]!r})"),
        "threshold": lm.threshold,
        **({"thresholds": lm.thresholds} if lm.scheme.multilabel else {}),
        "calibration": ({"method": "temperature", "temperature": spec["calibration"]["temperature"],
                         "meaning": "the probabilities are calibrated (fitted on validation); the threshold is "
                                    "the one chosen on the calibrated scores"}
                        if lm.temperature is not None else None),
        "preprocess": spec["preprocess"],
        "computes_in": {"precision": lm.precision, "weights": "float32"},
        "check": check,
    }, indent=2)
