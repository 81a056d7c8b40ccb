"""Pinned inputs: a cache's fingerprint names what changed; a run or sweep resumed on a re-split
cache is refused; a top-only sweep model is rebuilt only on the base weights it was trained on."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from xray_dist.data import fingerprint


def manifest(splits=("train", "val", "train"), labels=("normal", "finding", "normal")):
    return pa.table({"path": ["a.dcm", "b.dcm", "c.dcm"], "split": list(splits), "label": list(labels),
                     "patient": ["p1", "p2", "p3"]})


class TestChanges:
    spec = {"image_size": 32}

    def test_same_inputs_same_fingerprint(self):
        a = fingerprint.compute(manifest(), self.spec, "k1")
        b = fingerprint.compute(manifest().take([2, 0, 1]), dict(self.spec), "k1")  # row order is not content
        assert a == b and fingerprint.changes(a, b) == []

    @pytest.mark.parametrize("kw,part", [
        ({"m": manifest(splits=("train", "val", "val"))}, "splits"),
        ({"m": manifest(labels=("normal", "finding", "finding"))}, "labels"),
        ({"spec": {"image_size": 64}}, "preprocess"),
        ({"key": "k2"}, "images"),
    ])
    def test_each_change_is_named_alone(self, kw, part):
        base = fingerprint.compute(manifest(), self.spec, "k1")
        other = fingerprint.compute(kw.get("m", manifest()), kw.get("spec", self.spec), kw.get("key", "k1"))
        assert other["id"] != base["id"]
        assert fingerprint.changes(base, other) == [fingerprint.PARTS[part]]


@pytest.mark.slow
def test_resume_on_a_re_split_cache_is_refused(ray_cluster, synth_binary, tmp_path, capsys):
    """Train, prepare the same cache with another seed (patients move between splits), rerun the
    same train command: it stops before training, naming the split as what changed."""
    from xray_dist.cli.app import main

    cache, run = tmp_path / "cache", tmp_path / "run"
    prepare = ["prepare", str(synth_binary.out), "--labels", str(synth_binary.labels_csv), "--out", str(cache),
               "--image-size", "32"]
    assert main([*prepare, "--seed", "1"]) == 0
    train = ["train", "--cache", str(cache), "--out", str(run), "--epochs", "1", "--weights", "none",
             "--batch-size", "8", "--runner", "inprocess"]  # the refusal comes before any runner
    assert main(train) == 0
    recorded = json.loads((run / "inputs.json").read_text())["cache_fingerprint"]
    assert json.loads((run / "metrics.json").read_text())["cache_fingerprint"] == recorded["id"]
    history = (run / "history.csv").read_text()
    assert main([*prepare, "--seed", "2"]) == 0  # same images, other split
    capsys.readouterr()
    assert main([*train, "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "changed since the run" in err[0] and "split" in err[0]
    assert "labels" not in err[0] and "decoded images" not in err[0]
    assert (run / "history.csv").read_text() == history  # nothing trained, nothing rewritten
    assert main([*prepare, "--seed", "1"]) == 0  # the split it had: resumable again
    assert main([*train, "--epochs", "2"]) == 0
    assert (run / "history.csv").read_text().count("\n") == 3  # header + 2 epochs


def test_top_only_model_is_rebuilt_on_the_weights_it_was_trained_on(tmp_path):
    """A sweep trial's top-only export names its base weights file; replacing that file's content
    makes the rebuild fail with both hashes, instead of silently giving another model."""
    import numpy as np
    import tf_keras as keras

    from xray_dist.infra import storage
    from xray_dist.errors import ModelSpecError
    from xray_dist.model.network import ModelSpec, build_top_model
    from xray_dist.model.artifacts import full_model_from_top, save_spec

    base = tmp_path / "vgg16_notop.h5"
    keras.utils.set_random_seed(1)
    vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    vgg.save_weights(str(base))
    original = base.read_bytes()
    spec = ModelSpec(image_size=32, num_outputs=1)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    build_top_model(spec, (1, 1, 512)).save_weights(str(model_dir / "top_weights.h5"))
    save_spec(model_dir, spec, {"top": {"features_shape": [1, 1, 512], "weights": str(base), "seed": 0,
                                        "weights_sha256": storage.content_sha256(base)}})
    x = np.random.default_rng(0).integers(0, 255, (2, 32, 32), dtype=np.uint8)
    before = full_model_from_top(model_dir)(x, training=False).numpy()
    keras.utils.set_random_seed(2)  # other weights, same file name and shape
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(str(base))
    with pytest.raises(ModelSpecError, match="changed since the trial was trained"):
        full_model_from_top(model_dir)
    base.write_bytes(original)  # the original content back: rebuilt as before
    np.testing.assert_allclose(full_model_from_top(model_dir)(x, training=False).numpy(), before, rtol=1e-5)
