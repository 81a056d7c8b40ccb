"""``explain``: where the model looks — Grad-CAM on the last convolutional layer (``block5_conv3``).

Grad-CAM (Selvaraju et al., 2017): the gradients of a class score with respect to the last
convolutional feature maps, averaged over space, weight those maps; their ReLU'd sum, upsampled to
the model input, is the heatmap. The class score is the pre-activation output (the logit): for the
one-unit sigmoid head, ``z`` for the positive class and ``-z`` for the negative one; for a softmax
head, ``z_c``; for a multi-label head, the finding's own ``z_k`` (``--class FINDING``; by default
the most probable finding). Saturated probabilities would otherwise give vanishing gradients. The map has the
resolution of ``block5_conv3``: image size / 16 cells a side (14 at 224 px; 2 at 32 px).

For each input ``DIR/<name>.png`` shows the model input (exactly what the model saw, from the run's
preprocessing spec) with the heatmap over it, titled with the class and its probability, and
``DIR/<name>.npy`` holds the heatmap at model-input size with values in [0, 1]. ``DIR/explain.csv``
lists every input: explained, or the reason it could not be read.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np

from xray_dist.data.paths import PathNames, write_path_map
from xray_dist.errors import ModelSpecError
from xray_dist.inference.predict import expand_inputs, load_inputs
from xray_dist.infra import storage
from xray_dist.model.artifacts import LoadedModel, load_run_model

LAST_CONV = "block5_conv3"
#: ``DIR/explain.csv``: one row per input.
CSV_FIELDS = ["path", "name", "class", "probability", "predicted", "error"]


def resolve_class(lm: LoadedModel, chosen: str | None) -> int | None:
    """``--class`` as a class (or finding) name, a finding's key, or an index → index (None:
    explain the predicted class, or the most probable finding)."""
    if chosen is None:
        return None
    names = list(lm.scheme.names)
    if chosen in names:
        return names.index(chosen)
    if lm.scheme.multilabel and chosen in lm.scheme.keys:
        return lm.scheme.keys.index(chosen)
    if chosen.isdigit() and int(chosen) < len(names):
        return int(chosen)
    what = "findings" if lm.scheme.multilabel else "classes"
    raise ModelSpecError(f"--class {chosen!r}: this model's {what} are {names} (a name or an index "
                         f"0..{len(names) - 1})")


def gradcam(lm: LoadedModel, images: np.ndarray, class_index: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heatmaps ``(n, S, S)`` in [0, 1], the explained class per image and the class probabilities ``(n, K)``."""
    # TensorFlow: only when explaining (a model is loaded already)
    import tensorflow as tf
    import tf_keras as keras

    from xray_dist.model.network import scorer

    model = lm.model
    # the probabilities, and the class explained by default, come from the forward pass predict
    # uses, so explain.csv gives the network's probabilities exactly as predict computes them
    # (before a calibration temperature, which explain does not apply); the pass below is for the gradient
    probs = lm.scheme.probabilities(scorer(model)(images)).astype(np.float64)
    target = (np.argmax(probs, axis=1) if class_index is None else np.full(len(images), class_index)).astype(np.int32)
    base = model.get_layer("vgg16")
    inner = keras.Model(base.input, [base.get_layer(LAST_CONV).output, base.output])
    head = [model.get_layer(n) for n in ("gap", "head_dense") if n in {layer.name for layer in model.layers}]
    logits = model.get_layer("logits")
    x = model.get_layer("vgg_input")(tf.convert_to_tensor(images))
    with tf.GradientTape() as tape:
        conv, h = inner(x, training=False)
        tape.watch(conv)
        for layer in head:  # dropout is the identity at inference and is skipped
            h = layer(h)
        z = tf.matmul(tf.cast(h, tf.float32), logits.kernel) + logits.bias  # pre-activation scores
        # the pre-activation score of each class (or finding): -z for a binary model's negative class
        scores = tf.concat([-z, z], axis=-1) if z.shape[-1] == 1 and not lm.scheme.multilabel else z
        chosen = tf.gather(scores, tf.constant(target), batch_dims=1)
    grads = tape.gradient(chosen, conv)
    weights = tf.cast(tf.reduce_mean(grads, axis=(1, 2), keepdims=True), tf.float32)  # bfloat16 under --precision
    cam = tf.nn.relu(tf.reduce_sum(weights * tf.cast(conv, tf.float32), axis=-1))[..., None]
    size = images.shape[1]
    cam = tf.image.resize(cam, (size, size), method="bilinear")[..., 0].numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
    cam = np.where(peak > 0, cam / np.where(peak > 0, peak, 1.0), 0.0)
    return np.clip(cam, 0.0, 1.0).astype(np.float32), target, probs


def _unique_names(files: list[str], redact: bool = False) -> list[str]:
    """Output file names: each file's stem (with ``_1``, ``_2``... for repeats); a redacted file's
    key as it is."""
    seen: dict[str, int] = {}
    names = []
    for f in map(PurePosixPath, files):
        stem = f.name if redact else f.stem if f.suffix.lower() in (".dcm", ".dicom", "") else f.name
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        names.append(stem if n == 0 else f"{stem}_{n}")
    return names


def explain_files(run: str | Path, inputs: list[str], out: str | Path, class_name: str | None = None,
                  batch_size: int = 16, names: PathNames = PathNames(), path_map: str | None = None,
                  precision: str = "auto") -> list[dict]:
    """Grad-CAM for every readable input; returns (and writes to ``OUT/explain.csv``) one row per
    input. Files are named as ``names`` says (relative to their input, or a salted key) in the
    CSV, the output file names and the titles. The model computes in ``precision``
    (:mod:`xray_dist.model.precision`)."""
    storage.check_location(out)
    lm = load_run_model(run, precision)
    chosen = resolve_class(lm, class_name)
    files, rels = expand_inputs(inputs)
    if path_map:
        write_path_map(path_map, files, rels, names)
    with storage.staged_output(out) as local:  # an object-store --out gets the files when all are written
        return _explain(lm, chosen, files, rels, names, local, batch_size)


def _explain(lm: LoadedModel, chosen: int | None, files: list[str], rels: list[str], path_names: PathNames,
             out: Path, batch_size: int) -> list[dict]:
    from xray_dist.results.plots import plot_gradcam  # matplotlib: only when drawing

    names = list(lm.scheme.names)
    errors, good = load_inputs(files, rels, lm.preprocess, "explain", path_names)
    shown = [path_names.name(r) for r in rels]
    rows = [{"path": s, "name": name, "class": "", "probability": "", "predicted": "", "error": err}
            for s, name, err in zip(shown, _unique_names(shown, path_names.redact), errors)]
    for start in range(0, len(good), batch_size):
        chunk = good[start : start + batch_size]
        images = np.stack([img for _, img in chunk])
        heat, target, probs = gradcam(lm, images, chosen)
        for (i, img), hm, t, p in zip(chunk, heat, target, probs):
            row = rows[i]
            predicted = names[int(np.argmax(p))]  # multi-label: the most probable finding
            row.update({"class": names[int(t)], "probability": float(p[int(t)]), "predicted": predicted})
            np.save(out / f"{row['name']}.npy", hm)
            title = f"{row['name']}\nGrad-CAM for {names[int(t)]}: p = {p[int(t)]:.3f}"
            if names[int(t)] != predicted:
                title += f" (predicted: {predicted}, p = {p.max():.3f})"
            plot_gradcam(img, hm, title, out / f"{row['name']}.png")
    storage.write_csv(out / "explain.csv", rows, CSV_FIELDS)
    return rows
