"""``--augment light`` (#23): the transform does the geometry it promises (checked against NumPy
references written here), never flips, is drawn from (seed, epoch, image) alone, reaches the
training input, keeps exact resume (the resume tests' run in tests/test_train.py is augmented), and
turns the frozen-feature shortcut off."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from xray_dist.training import augment


def _apply(images, params) -> np.ndarray:
    return np.asarray(augment.apply(images, np.asarray(params, np.float32)))


def _params(angle=0.0, scale=1.0, sx=0.0, sy=0.0, bright=0.0, contrast=1.0) -> list:
    return [[angle, scale, sx, sy, bright, contrast]]


def _bilinear_reference(img: np.ndarray, p) -> np.ndarray:
    """The promised transform, written out: each output pixel samples the input at the inverse of
    (scale, rotate, shift) about the centre, bilinearly, coordinates clamped to the edge."""
    angle, scale, sx, sy, bright, contrast = p
    h, w = img.shape
    c = (h - 1) / 2
    yy, xx = np.meshgrid(np.arange(h, dtype=float), np.arange(w, dtype=float), indexing="ij")
    dx, dy = xx - c - sx * w, yy - c - sy * h
    src_x = np.clip((np.cos(angle) * dx + np.sin(angle) * dy) / scale + c, 0, w - 1)
    src_y = np.clip((-np.sin(angle) * dx + np.cos(angle) * dy) / scale + c, 0, h - 1)
    x0, y0 = np.floor(src_x).astype(int), np.floor(src_y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = src_x - x0, src_y - y0
    f = img.astype(float) / 255
    out = (f[y0, x0] * (1 - fx) + f[y0, x1] * fx) * (1 - fy) + (f[y1, x0] * (1 - fx) + f[y1, x1] * fx) * fy
    out = (out - out.mean()) * contrast + out.mean() + bright
    return np.clip(np.rint(out * 255), 0, 255)


def test_the_transform_does_the_geometry_it_promises():
    rng = np.random.default_rng(0)
    img = (rng.random((1, 32, 32)) * 255).astype(np.uint8)
    np.testing.assert_array_equal(_apply(img, _params()), img)  # nothing drawn, nothing changed
    np.testing.assert_array_equal(_apply(img, _params(angle=np.pi / 2))[0], np.rot90(img[0], -1))
    shifted = _apply(img, _params(sx=0.25))[0]  # 8 px to the right, the left edge continued
    np.testing.assert_array_equal(shifted[:, 8:], img[0, :, :-8])
    np.testing.assert_array_equal(shifted[:, :8], np.repeat(img[0, :, :1], 8, axis=1))
    grey = np.full((1, 16, 16), 100, np.uint8)
    assert (_apply(grey, _params(bright=0.08)) == 100 + round(0.08 * 255)).all()
    # random draws of `light`: the reference, to one grey level (float32 against float64)
    names = [f"img{i}.dcm" for i in range(6)]
    params = augment.draws(names, seed=3, epoch=2)
    imgs = (rng.random((6, 40, 40)) * 255).astype(np.uint8)
    out = _apply(imgs, params)
    for k in range(6):
        assert np.abs(out[k].astype(int) - _bilinear_reference(imgs[k], params[k])).max() <= 1, k


def test_draws_come_from_seed_epoch_and_image_alone_and_never_flip():
    names = [f"patient{i // 2}/img{i}.dcm" for i in range(400)]
    a = augment.draws(names, seed=7, epoch=3)
    rev = augment.draws(names[::-1], seed=7, epoch=3)
    np.testing.assert_array_equal(a, rev[::-1])  # the batch it sits in does not matter
    assert not np.allclose(a, augment.draws(names, seed=7, epoch=4))  # a new epoch, a new draw
    assert not np.allclose(a, augment.draws(names, seed=8, epoch=3))
    assert np.abs(np.rad2deg(a[:, 0])).max() <= augment.ROTATE_DEG and np.abs(a[:, 2:4]).max() <= augment.SHIFT
    assert augment.SCALE[0] <= a[:, 1].min() and a[:, 1].max() <= augment.SCALE[1]
    assert np.abs(np.rad2deg(a[:, 0])).max() > 0.8 * augment.ROTATE_DEG  # the range is used
    # no flip: every transform keeps orientation (a positive determinant)
    t = np.asarray(augment.transforms(a.astype(np.float32), 224))
    assert (t[:, 0] * t[:, 4] - t[:, 1] * t[:, 3] > 0).all()


def test_the_training_input_carries_each_images_draw(ray_cluster):
    """ShardCache (whole split) gives each batch the draws of its rows' names for that epoch, the
    same whatever order Ray Data delivered the rows in; train_input applies them."""
    import ray

    from xray_dist.training.pipeline import BatchOrder, ShardCache, train_input

    def shard(reverse):
        items = [{"path": f"p{i:03d}.dcm", "x": np.full((8, 8), i, np.uint8), "label": i % 2, "weight": 1.0}
                 for i in range(32)]
        return ray.data.from_items(items[::-1] if reverse else items).iterator()

    order = BatchOrder(batch_size=8, per_pass=4, shuffle_buffer=0, seed=5, limit_bytes=1 << 20, whole=True,
                       augment="light")
    one, other = ShardCache(shard(False), order), ShardCache(shard(True), order)
    for epoch in (1, 2):
        a, b = list(one.batches()), list(other.batches())
        for (x, y, w, p), (x2, _, _, p2) in zip(a, b):
            np.testing.assert_array_equal(x, x2)
            np.testing.assert_array_equal(p, p2)
            expected = augment.draws([f"p{int(v):03d}.dcm" for v in x[:, 0, 0]], seed=5, epoch=epoch)
            np.testing.assert_allclose(p, expected, rtol=1e-6)
    import tensorflow as tf

    fresh = ShardCache(shard(False), order)
    raw = next(iter(ShardCache(shard(False), order).batches()))
    x, y, _ = next(iter(train_input(tf.distribute.get_strategy(), fresh, tf.TensorSpec((None, 8, 8), tf.uint8))))
    np.testing.assert_array_equal(x.numpy(), _apply(raw[0], raw[3]))
    np.testing.assert_array_equal(y.numpy(), raw[1])


def test_frozen_features_are_refused_with_augmentation_and_sweeps_drop_them(tmp_path, monkeypatch, caplog):
    from xray_dist.config import ConfigError, SweepConfig, TrainConfig
    from xray_dist.training import tune

    with pytest.raises(ConfigError, match="cannot train on frozen features"):
        TrainConfig(cache="c", out="o", features=str(tmp_path), augment="light")

    def computed(*_):
        raise AssertionError("frozen features computed for an augmented sweep")

    monkeypatch.setattr(tune, "ensure_features", computed)
    base = TrainConfig(cache=str(tmp_path), out=str(tmp_path / "o"), augment="light")
    with caplog.at_level(logging.INFO, logger="xray_dist"):
        assert tune._shared_features(SweepConfig(base=base, out=str(tmp_path / "s"))) == {}
    assert "shared frozen features are off" in caplog.text
