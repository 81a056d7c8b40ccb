"""The naive way: what a user writes from the standard Keras transfer-learning recipe.

- Input: a ``tf.data`` pipeline over the file list whose ``py_function`` reads each DICOM with
  pydicom, min–max scales it, resizes it to the model size and stacks three channels — every
  epoch. It is the best a user would do: parallel ``map`` (AUTOTUNE), ``prefetch`` (AUTOTUNE),
  reshuffled file order each epoch.
- Model: VGG16 (``include_top=False``) with ``trainable = False`` under a GAP + optional Dense +
  sigmoid head, so the frozen base is recomputed for every image of every epoch of every trial.
- Search: each head width trained in turn for the same epochs; no early stopping, no sharing.

Nothing here imports xray_dist: the baseline must not benefit from our code.
"""

from __future__ import annotations

import time

import numpy as np


def naive_load(path: str, size: int) -> np.ndarray:
    """One DICOM → ``(size, size, 3)`` float32 in [0, 255], the way the recipe does it."""
    import pydicom
    import tensorflow as tf

    ds = pydicom.dcmread(path)
    img = ds.pixel_array.astype(np.float32)
    img = img * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
    if ds.PhotometricInterpretation == "MONOCHROME1":
        img = img.max() - img
    img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6) * 255.0
    img = tf.image.resize(img[..., None], (size, size)).numpy()
    return np.repeat(img, 3, axis=-1)


def naive_dataset(paths: list[str], labels: list[int], size: int, batch: int, seed: int = 0):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((paths, np.asarray(labels, np.float32)))
    ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)

    def load(p, y):
        x = tf.py_function(lambda q: naive_load(q.numpy().decode(), size), [p], tf.float32)
        x.set_shape((size, size, 3))
        return x, y

    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch).prefetch(tf.data.AUTOTUNE)


def naive_input_rate(paths: list[str], labels: list[int], size: int, batch: int, epochs: int) -> dict:
    """Images/s the naive pipeline delivers, per epoch (no model: input alone)."""
    ds = naive_dataset(paths, labels, size, batch)
    per_epoch = []
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for x, _ in ds:
            n += int(x.shape[0])
        per_epoch.append({"images": n, "seconds": time.perf_counter() - t0})
    return {"epochs": per_epoch}


def naive_sweep(train: tuple[list[str], list[int]], val: tuple[list[str], list[int]], head_widths: list[int],
                epochs: int, size: int, lr: float, batch: int, seed: int = 0) -> dict:
    """Random-init VGG16 (``weights=None``: no download here) frozen, one head per trial, no early stop."""
    import tensorflow as tf
    import tf_keras as keras

    trials = []
    t_all = time.perf_counter()
    for hw in head_widths:
        t0 = time.perf_counter()
        keras.utils.set_random_seed(seed)
        base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(size, size, 3))
        base.trainable = False
        inp = keras.Input((size, size, 3))
        x = keras.applications.vgg16.preprocess_input(inp)
        x = keras.layers.GlobalAveragePooling2D()(base(x, training=False))
        if hw:
            x = keras.layers.Dense(hw, activation="relu")(x)
        model = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(x))
        model.compile(optimizer=keras.optimizers.Adam(lr), loss="binary_crossentropy")
        model.fit(naive_dataset(*train, size, batch, seed), epochs=epochs, verbose=0)
        val_ds = tf.data.Dataset.from_tensor_slices(val[0]).map(
            lambda p: tf.ensure_shape(tf.py_function(lambda q: naive_load(q.numpy().decode(), size), [p], tf.float32),
                                      (size, size, 3))).batch(batch)
        scores = model.predict(val_ds, verbose=0).ravel()
        trials.append({"head_width": hw, "seconds": time.perf_counter() - t0, "val_auc": _auroc(val[1], scores)})
    return {"trials": trials, "seconds": time.perf_counter() - t_all}


def _auroc(y, s) -> float:
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
                 / (len(pos) * len(neg)))
