"""xray_dist.model.network: head sized to the task, unfreeze depth, in-model preprocessing, weights loading."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
import tf_keras  # noqa: E402 - pinned: if it cannot be imported, these tests must fail, not skip

from xray_dist.errors import ModelSpecError  # noqa: E402
from xray_dist.model.network import ModelSpec, VGGInput, build_model, trainable_parameters
from xray_dist.model.artifacts import load_weights_checked# noqa: E402


def conv_trainable(model) -> dict[int, bool]:
    base = model.get_layer("vgg16")
    out = {}
    for layer in base.layers:
        if layer.name.startswith("block") and "conv" in layer.name:
            out.setdefault(int(layer.name[5]), layer.trainable)
    return out


class TestHead:
    def test_binary_is_one_sigmoid(self):
        m = build_model(ModelSpec(image_size=32, num_outputs=1))
        assert m.output_shape == (None, 1)
        assert m.get_layer("logits").activation.__name__ == "sigmoid"
        out = m(np.zeros((2, 32, 32), np.uint8)).numpy()
        assert np.all((out > 0) & (out < 1))

    def test_k_softmax_and_hidden_layer(self):
        m = build_model(ModelSpec(image_size=32, num_outputs=4, head_width=16))
        assert m.output_shape == (None, 4)
        assert m.get_layer("head_dense").units == 16
        np.testing.assert_allclose(m(np.full((3, 32, 32), 100, np.uint8)).numpy().sum(axis=1), 1.0, rtol=1e-5)

    def test_no_hidden_layer_when_width_zero(self):
        m = build_model(ModelSpec(image_size=32, num_outputs=1, head_width=0))
        assert "head_dense" not in [layer.name for layer in m.layers]


class TestUnfreeze:
    @pytest.mark.parametrize("depth", [0, 1, 2, 5])
    def test_top_blocks_train(self, depth):
        m = build_model(ModelSpec(image_size=32, num_outputs=1, unfreeze_blocks=depth))
        assert conv_trainable(m) == {b: b > 5 - depth for b in range(1, 6)}

    def test_more_depth_more_parameters(self):
        counts = [trainable_parameters(build_model(ModelSpec(32, 1, unfreeze_blocks=d))) for d in (0, 1, 2)]
        assert counts[0] == 512 + 1 and counts[0] < counts[1] < counts[2]


class TestPreprocessing:
    def test_matches_keras_preprocess_input(self):
        img = np.random.default_rng(0).integers(0, 256, (2, 8, 8), dtype=np.uint8)
        ours = VGGInput()(img).numpy()
        ref = tf_keras.applications.vgg16.preprocess_input(np.repeat(img[..., None], 3, -1).astype("float32"))
        np.testing.assert_allclose(ours, ref, atol=1e-4)


class TestWeights:
    def test_weights_file_by_path(self, tmp_path):
        src = tf_keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
        path = tmp_path / "vgg16_notop.h5"
        src.save_weights(str(path))
        m = build_model(ModelSpec(32, 1), weights=str(path))
        np.testing.assert_array_equal(m.get_layer("vgg16").get_layer("block3_conv2").get_weights()[0],
                                      src.get_layer("block3_conv2").get_weights()[0])

    def test_weights_path_missing(self, tmp_path):
        with pytest.raises(ModelSpecError, match="no such file"):
            build_model(ModelSpec(32, 1), weights=str(tmp_path / "nope.h5"))

    def test_checkpoint_with_other_logits_names_both_shapes(self, tmp_path):
        four = build_model(ModelSpec(32, 4))
        path = tmp_path / "four.h5"
        four.save_weights(str(path))
        binary = build_model(ModelSpec(32, 1))
        with pytest.raises(ModelSpecError, match=r"\(512, 4\).*\(512, 1\)"):
            load_weights_checked(binary, path)

    def test_imagenet_offline_error_names_file_and_flag(self, tmp_path):
        # A fresh process with an empty Keras cache and no way out (an unroutable proxy).
        env = dict(os.environ, KERAS_HOME=str(tmp_path), HTTPS_PROXY="http://127.0.0.1:9",
                   HTTP_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
        code = ("from xray_dist.model.network import build_model, ModelSpec\n"
                "try:\n    build_model(ModelSpec(32, 1), weights='imagenet')\n"
                "except Exception as e:\n    print(type(e).__name__, e)\n")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert "ModelSpecError" in out.stdout, out.stderr[-2000:]
        assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in out.stdout and "--weights" in out.stdout


class TestTopModel:
    """The frozen-feature top model must start where the full model starts, or a features-trained
    sweep trial would fine-tune other weights than ``xray-dist train`` does."""

    @staticmethod
    def weighted(model) -> dict[str, list]:
        layers = list(model.layers)
        if "vgg16" in [la.name for la in layers]:
            layers += model.get_layer("vgg16").layers
        return {la.name: la.get_weights() for la in layers if la.weights and la.name != "vgg16"}

    @pytest.mark.parametrize("weights", ["none", "file"])
    def test_starts_from_the_full_models_weights(self, weights, tmp_path):
        from xray_dist.model.network import build_top_model

        if weights == "file":
            src = tf_keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
            weights = str(tmp_path / "vgg16_notop.h5")
            src.save_weights(weights)
        spec = ModelSpec(32, 3, head_width=8, unfreeze_blocks=2)
        tf_keras.utils.set_random_seed(7)
        full = self.weighted(build_model(spec, weights, seed=7))
        tf_keras.utils.set_random_seed(7)
        top = build_top_model(spec, (4, 4, 256), weights, seed=7)
        top_w = self.weighted(top)
        assert set(top_w) == {"block4_conv1", "block4_conv2", "block4_conv3", "block5_conv1", "block5_conv2",
                              "block5_conv3", "head_dense", "logits"}
        for name, ws in top_w.items():
            for a, b in zip(ws, full[name]):
                np.testing.assert_array_equal(a, b, err_msg=name)
        # and a different seed gives a different head (the seed is really what sets it)
        tf_keras.utils.set_random_seed(8)
        other = self.weighted(build_top_model(spec, (4, 4, 256), weights, seed=8))
        assert not np.array_equal(other["logits"][0], top_w["logits"][0])


def test_the_compiled_forward_pass_is_the_model_and_lets_it_go():
    """network.scorer: the same numbers as the model's own call at any batch size and split into
    batches (float32 here, where compiled and eager agree to rounding), (n, S, S, 1) images read as
    (n, S, S); one compiled function per model, and a model nobody holds is freed with its entry."""
    import gc
    import weakref

    from xray_dist.model import network

    tf_keras.utils.set_random_seed(0)
    cached = len(network._SCORERS)
    model = build_model(ModelSpec(image_size=32, num_outputs=3, head_width=8))
    x = np.random.default_rng(0).integers(0, 256, (7, 32, 32), dtype=np.uint8)
    run = network.scorer(model)
    assert network.scorer(model) is run
    whole = run(x)
    np.testing.assert_allclose(whole, np.asarray(model(x, training=False)), atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([run(x[:3]), run(x[3:])]), whole)
    np.testing.assert_array_equal(run(x[..., None]), whole)
    assert run.fn.experimental_get_tracing_count() == 1  # one graph for batches of 7, 3, 4
    ref = weakref.ref(model)
    del model, run
    gc.collect()
    assert ref() is None and len(network._SCORERS) == cached
