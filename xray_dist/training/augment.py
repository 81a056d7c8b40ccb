"""Input augmentation for fine-tuning (``--augment light``), off by default.

``light``: a small random affine (rotation ±7°, scale 0.9–1.1, translation ±6 % of the side, sampled
bilinearly with the edge pixels continued outward) and brightness ±0.08 / contrast ×0.9–1.1 on the
[0, 1] scale. The draws are NumPy (:func:`draws`, beside the batch); the transform runs in
TensorFlow's ``tf.data`` map (:func:`apply`), in parallel, so that it keeps a GPU fed. No flip: a chest film's left and right are anatomy (the heart, situs), and a flipped
film is a film no patient has.

Each image's draw comes from ``(seed, epoch, its name in the cache)`` alone, so the same epoch gives
the same augmented batch on any worker, for any spread of the replicas, and in a resumed run (the
exact-resume guarantee of :class:`xray_dist.training.pipeline.ShardCache` holds). Validation and
test images are never augmented. Frozen VGG blocks see augmented images too, so a precomputed
frozen-feature cache no longer matches what they would compute: with augmentation, sweeps train
every trial on images, and a run is refused the shortcut (:mod:`xray_dist.training.tune`,
:class:`xray_dist.config.TrainConfig`).
"""

from __future__ import annotations

import hashlib

import numpy as np

#: The ranges of ``light``.
ROTATE_DEG = 7.0
SCALE = (0.9, 1.1)
SHIFT = 0.06
BRIGHTNESS = 0.08
CONTRAST = (0.9, 1.1)


def _key(name) -> int:
    """A stable 64-bit number for an image's name in the cache (not Python's salted ``hash``)."""
    raw = name if isinstance(name, bytes) else str(name).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def draws(names, seed: int, epoch: int) -> np.ndarray:
    """``(n, 6)``: each image's angle (rad), scale, shift x, shift y (fractions of the side),
    brightness and contrast, from ``(seed, epoch, name)``."""
    out = np.empty((len(names), 6))
    for i, name in enumerate(names):
        r = np.random.default_rng([int(seed), int(epoch), _key(name)])
        out[i] = (np.deg2rad(r.uniform(-ROTATE_DEG, ROTATE_DEG)), r.uniform(*SCALE), r.uniform(-SHIFT, SHIFT),
                  r.uniform(-SHIFT, SHIFT), r.uniform(-BRIGHTNESS, BRIGHTNESS), r.uniform(*CONTRAST))
    return out


def transforms(params, size: int):
    """``(n, 8)`` projective transforms (TensorFlow's convention: each maps an output pixel ``(x, y)``
    to the input point it samples) that rotate, scale and shift ``size``-pixel images about their
    centre as ``params`` (:func:`draws`) say."""
    import tensorflow as tf  # TensorFlow: workers only

    params = tf.cast(params, tf.float32)
    angle, scale, sx, sy = params[:, 0], params[:, 1], params[:, 2], params[:, 3]
    c = (size - 1) / 2
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    ox, oy = c + sx * size, c + sy * size  # where the centre goes
    zeros = tf.zeros_like(angle)
    return tf.stack([cos, sin, c - cos * ox - sin * oy, -sin, cos, c + sin * ox - cos * oy, zeros, zeros], axis=1)


def apply(images, params):
    """The augmented batch, in TensorFlow (inside ``tf.data``, in parallel with training): ``images``
    uint8 ``(n, S, S)``, ``params`` float ``(n, 6)`` from :func:`draws`; bilinear, the edge pixels
    continued outward, then brightness and contrast about each image's mean; uint8 out."""
    import tensorflow as tf  # TensorFlow: workers only

    size = images.shape[-1]
    x = tf.cast(images, tf.float32)[..., None] / 255.0
    x = tf.raw_ops.ImageProjectiveTransformV3(images=x, transforms=transforms(params, size),
                                              output_shape=tf.shape(x)[1:3], fill_value=0.0,
                                              interpolation="BILINEAR", fill_mode="NEAREST")[..., 0]
    bright = tf.cast(params[:, 4], tf.float32)[:, None, None]
    contrast = tf.cast(params[:, 5], tf.float32)[:, None, None]
    mean = tf.reduce_mean(x, axis=(1, 2), keepdims=True)
    x = (x - mean) * contrast + mean + bright
    out = tf.cast(tf.clip_by_value(tf.round(x * 255.0), 0.0, 255.0), tf.uint8)
    return tf.ensure_shape(out, [None, size, size])  # the model input keeps its static size
