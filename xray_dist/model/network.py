"""VGG16 base + a head sized to the task; preprocessing inside the model.

The model takes the cached image as is — ``(S, S)`` or ``(S, S, 1)`` uint8, 0 = black — and does
the rest itself (:class:`VGGInput`): grayscale → 3 identical channels → ``vgg16.preprocess_input``'s
transform (BGR order, ImageNet channel means subtracted, no scaling). So training, prediction and
export can never preprocess differently.

Layers keep Keras's names (``block1_conv1`` … ``block5_pool``) so that freezing by block is a
name lookup. The head is ``GlobalAveragePooling2D`` → optional ``Dense(head_width, relu)`` +
dropout → ``logits`` (1 sigmoid unit for two classes, K softmax units for K classes, K sigmoid
units for K findings of a multi-label task).

Keras here is ``tf_keras`` (Keras 2): Keras 3's ``model.fit`` fails under
MultiWorkerMirroredStrategy (keras-team/keras#20585).
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras as keras

from xray_dist.errors import ModelSpecError
from xray_dist.infra import storage

log = logging.getLogger(__name__)

#: The file Keras downloads for ``weights="imagenet"`` (and what ``--weights PATH`` should point to offline).
IMAGENET_NOTOP = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + IMAGENET_NOTOP
_BGR_MEAN = (103.939, 116.779, 123.68)


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild the architecture (saved beside every checkpoint and export)."""

    image_size: int
    num_outputs: int
    head_width: int = 0
    dropout: float = 0.3
    unfreeze_blocks: int = 0
    multilabel: bool = False  # K independent sigmoid outputs (one per finding) instead of one softmax

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(**{k: d[k] for k in ("image_size", "num_outputs", "head_width", "dropout", "unfreeze_blocks")},
                   multilabel=bool(d.get("multilabel", False)))


@keras.utils.register_keras_serializable(package="xray_dist")
class VGGInput(keras.layers.Layer):
    """Cached uint8 grayscale → VGG16 input: float, 3 channels, BGR mean subtracted."""

    def call(self, x):
        x = tf.cast(x, self.compute_dtype)
        if x.shape.rank == 3:
            x = x[..., None]
        x = tf.concat([x, x, x], axis=-1)
        return x - tf.constant(_BGR_MEAN, dtype=self.compute_dtype)


def two_class_probabilities(p):
    """One sigmoid unit's probability ``p`` (``(n, 1)``) → ``(n, 2)``: ``[1 - p, p]``. The rule of
    :meth:`xray_dist.data.classes.ClassScheme.probabilities`, on TensorFlow tensors (inside a
    serving model, and differentiable for Grad-CAM)."""
    return tf.concat([1.0 - p, p], axis=-1)


@keras.utils.register_keras_serializable(package="xray_dist")
class ClassProbabilities(keras.layers.Layer):
    """Model outputs → ``(n, K)`` class probabilities: one sigmoid unit ``p`` becomes ``[1 - p, p]``
    (multi-label outputs are each finding's probability already and pass as they are). With a
    ``temperature`` (``xray-dist calibrate``), the probabilities are calibrated as
    :func:`xray_dist.model.calibration.apply` does: softmax of the log probabilities over ``T``
    for classes, each finding's logit over its own ``T``."""

    def __init__(self, multilabel: bool = False, temperature=None, **kwargs):
        super().__init__(**kwargs)
        self.multilabel = multilabel
        self.temperature = temperature

    def get_config(self):
        return {**super().get_config(), "multilabel": self.multilabel, "temperature": self.temperature}

    def call(self, x):
        x = tf.cast(x, tf.float32)
        if x.shape[-1] == 1 and not self.multilabel:
            x = two_class_probabilities(x)
        if self.temperature is None:
            return x
        eps = 1e-7
        t = tf.constant(self.temperature, tf.float32)
        if self.multilabel:
            p = tf.clip_by_value(x, eps, 1 - eps)
            return tf.sigmoid((tf.math.log(p) - tf.math.log1p(-p)) / t)
        return tf.nn.softmax(tf.math.log(tf.clip_by_value(x, eps, 1.0)) / t, axis=-1)


def vgg16_base(image_size: int, weights: str) -> keras.Model:
    """VGG16 without its top. ``weights``: ``imagenet``, ``none`` or a path to a no-top ``.h5`` file."""
    shape = (image_size, image_size, 3)
    if weights == "none":
        return keras.applications.VGG16(include_top=False, weights=None, input_shape=shape)
    if weights == "imagenet":
        try:
            return keras.applications.VGG16(include_top=False, weights="imagenet", input_shape=shape)
        except Exception as e:  # noqa: BLE001 - offline clusters fail in many ways (DNS, SSL, HTTP)
            cached = Path(os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras"))) / "models" / IMAGENET_NOTOP
            raise ModelSpecError(
                f"could not fetch the ImageNet VGG16 weights ({type(e).__name__}: {e}). Expected the file "
                f"{IMAGENET_NOTOP} (from {IMAGENET_URL}) in {cached.parent}; on an offline cluster copy it to shared "
                f"storage and pass --weights /path/to/{IMAGENET_NOTOP}"
            ) from None
    if not storage.is_file(weights):
        raise ModelSpecError(f"--weights {weights}: no such file (expected 'imagenet', 'none' or a path or URI of "
                             f"{IMAGENET_NOTOP})")
    path = storage.local_file(weights)  # an object is downloaded once per process, into its own scratch
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=shape)
    try:
        base.load_weights(str(path))
    except Exception as e:  # noqa: BLE001
        raise ModelSpecError(f"--weights {weights}: not VGG16 no-top weights ({type(e).__name__}: {e})") from None
    return base


def set_unfrozen_blocks(base: keras.Model, unfreeze_blocks: int) -> None:
    """The top ``unfreeze_blocks`` conv blocks train; the others are frozen (by layer name)."""
    first_trainable = 6 - unfreeze_blocks  # blocks 1..5
    for layer in base.layers:
        if layer.name.startswith("block"):
            layer.trainable = int(layer.name[5]) >= first_trainable
        else:
            layer.trainable = False


def add_head(features, spec: ModelSpec, seed: int = 0):
    """GAP → optional hidden Dense + dropout → logits. The head's initial weights come from ``seed``
    alone (not from the global random state, which building the base has advanced by an amount that
    depends on how much of the base was built), so the full model and the frozen-feature top model
    start from the same head."""
    x = keras.layers.GlobalAveragePooling2D(name="gap")(features)
    if spec.head_width:
        x = keras.layers.Dense(spec.head_width, activation="relu", name="head_dense",
                               kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(x)
        # a tf.random.Generator whose state a checkpoint saves (train.save_training_state): a
        # resumed run draws the masks the uninterrupted run would have drawn
        x = keras.layers.Dropout(spec.dropout, name="head_dropout", seed=seed, rng_type="stateful")(x)
    activation = "sigmoid" if spec.num_outputs == 1 or spec.multilabel else "softmax"
    return keras.layers.Dense(spec.num_outputs, activation=activation, dtype="float32", name="logits",
                              kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1))(x)


def build_model(spec: ModelSpec, weights: str = "none", seed: int = 0) -> keras.Model:
    """The full model: cached image in, class probabilities out. With ``weights="none"`` the base's
    random weights follow the global seed (``keras.utils.set_random_seed``) set before the call."""
    if spec.num_outputs < 1:
        raise ModelSpecError(f"num_outputs must be >= 1. Received: num_outputs={spec.num_outputs}")
    base = vgg16_base(spec.image_size, weights)
    set_unfrozen_blocks(base, spec.unfreeze_blocks)
    inputs = keras.Input((spec.image_size, spec.image_size), dtype="uint8", name="image")
    x = VGGInput(name="vgg_input")(inputs)
    x = base(x, training=False) if spec.unfreeze_blocks == 0 else base(x)
    return keras.Model(inputs, add_head(x, spec, seed), name="xray_vgg16")


def frozen_part(image_size: int, weights: str, unfreeze_blocks: int) -> keras.Model:
    """Cached image → activations at the frozen boundary (``block{5-D}_pool``)."""
    base = vgg16_base(image_size, weights)
    inputs = keras.Input((image_size, image_size), dtype="uint8", name="image")
    x = VGGInput(name="vgg_input")(inputs)
    sub = keras.Model(base.input, base.get_layer(f"block{5 - unfreeze_blocks}_pool").output)
    return keras.Model(inputs, sub(x, training=False), name="vgg16_frozen")


def build_top_model(spec: ModelSpec, feature_shape: tuple, weights: str | None = None, seed: int = 0) -> keras.Model:
    """The trainable part only: frozen-boundary activations → VGG blocks 5−D+1..5 → head.

    Layers carry the names of the full model's layers, so :func:`transfer_top_weights` can copy
    them into a full model by name for export. With ``weights`` the unfrozen VGG blocks start from
    that base (ImageNet, a file, or for ``"none"`` the random base the global seed gives, built
    first as :func:`build_model` builds it): the same starting point as the full model, so a
    features-trained run is the run the full model would have made. ``weights=None`` (loading a
    trained top) skips that.
    """
    # the base first: with random weights it must consume the global random state as build_model's does
    base = vgg16_base(spec.image_size, weights) if weights is not None and spec.unfreeze_blocks else None
    inputs = keras.Input(tuple(feature_shape), name="features")
    x = inputs
    filters = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}
    convs = {1: 2, 2: 2, 3: 3, 4: 3, 5: 3}
    for block in range(6 - spec.unfreeze_blocks, 6):
        for i in range(1, convs[block] + 1):
            x = keras.layers.Conv2D(filters[block], 3, activation="relu", padding="same",
                                    name=f"block{block}_conv{i}")(x)
        x = keras.layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(x)
    top = keras.Model(inputs, add_head(x, spec, seed), name="xray_vgg16_top")
    if base is not None:
        for layer in top.layers:
            if layer.name.startswith("block") and layer.weights:
                layer.set_weights(base.get_layer(layer.name).get_weights())
    return top


def transfer_top_weights(top: keras.Model, full: keras.Model) -> None:
    """Copy every weighted layer of ``top`` into the same-named layer of ``full`` (or its VGG16 base)."""
    base = full.get_layer("vgg16")
    for layer in top.layers:
        if not layer.weights:
            continue
        target = base.get_layer(layer.name) if layer.name.startswith("block") else full.get_layer(layer.name)
        target.set_weights(layer.get_weights())


def trainable_parameters(model: keras.Model) -> int:
    return int(sum(int(tf.size(w)) for w in model.trainable_weights))


def scorer(model: keras.Model):
    """``model``'s forward pass at inference (``training=False``), compiled once per model for any
    batch size: ``scorer(model)(x)`` → a NumPy array.

    Every path that turns images or frozen features into numbers goes through it: predict,
    evaluate, explain's probabilities, training's validation scores, frozen-feature extraction and
    a sweep trial's scores. One kind of graph for all of them is what makes them agree exactly:
    a compiled graph fuses each convolution with its bias and activation, and in bfloat16 that
    rounds differently from layer-by-layer eager calls (by up to 1e-3 in a probability), while
    between compiled graphs of the same layers the numbers are the same. It is also the fast way:
    eager calls in bfloat16 on a CPU spend about as long between operations as in them.

    The cache holds the model weakly: keep the model while you use its scorer."""
    fn = _SCORERS.get(model)
    if fn is None:
        fn = _SCORERS[model] = _CompiledForward(model)
    return fn


class _CompiledForward:
    """:func:`scorer`'s function: one ``tf.function`` over any batch size of the model's input."""

    def __init__(self, model: keras.Model):
        ref = weakref.ref(model)  # the cache must not keep the model alive
        spec = model.inputs[0]
        self.dtype, self.shape = spec.dtype.as_numpy_dtype, tuple(spec.shape[1:])
        self.fn = tf.function(lambda x: ref()(x, training=False), autograph=False,
                              input_signature=[tf.TensorSpec((None, *self.shape), spec.dtype)])

    def trace(self) -> None:
        """Build the graph now rather than at the first batch."""
        self.fn.get_concrete_function()

    def __call__(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=self.dtype)
        if x.ndim == len(self.shape) + 2 and x.shape[-1] == 1:  # (n, S, S, 1) images: the model takes (n, S, S)
            x = x[..., 0]
        return self.fn(x).numpy()


_SCORERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
