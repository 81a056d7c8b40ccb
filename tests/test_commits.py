"""Writes that must be seen whole: a directory replaced on object storage (a run's ``model/``, an
export's ``savedmodel/``) stays loadable when the upload of its successor fails half-way, and the
sweep's ``best.json`` is rewritten by ``evaluate`` only under the sweep's lock."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xray_dist.infra import files, storage  # files: where put_dir looks up write_bytes (patched below)
from xray_dist.errors import StorageError


# ---- factories ---------------------------------------------------------------------------------------

def weights_digest(model) -> str:
    """SHA-256 of a Keras model's weight values, in layer order."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two loadable model directories (``model_spec.json`` + full ``weights.h5`` at 32 px, random
    weights from two seeds, two thresholds), each with the digest of the weights it was saved from:
    ``{"a": (dir, digest, threshold), "b": ...}``. No training: the loader only needs the files."""
    import tf_keras as keras

    from xray_dist.data.classes import ClassScheme
    from xray_dist.config import PreprocessSpec
    from xray_dist.model.network import ModelSpec, build_model
    from xray_dist.model.artifacts import FULL_WEIGHTS, save_spec

    out = {}
    for tag, seed, threshold in (("a", 1, 0.25), ("b", 2, 0.75)):
        d = tmp_path_factory.mktemp(f"model_{tag}") / "model"
        d.mkdir()
        keras.utils.set_random_seed(seed)
        spec = ModelSpec(image_size=32, num_outputs=1)
        model = build_model(spec, weights="none", seed=seed)
        model.save_weights(str(d / FULL_WEIGHTS))
        save_spec(d, spec, {"classes": ClassScheme(("normal", "finding")).to_dict(),
                            "preprocess": PreprocessSpec(image_size=32).to_dict(), "threshold": threshold})
        out[tag] = (d, weights_digest(model), threshold)
    assert out["a"][1] != out["b"][1]
    return out


@contextlib.contextmanager
def failing_put(n: int, under: str, s3=None, bucket: str = ""):
    """``files.write_bytes`` — the PUT of ``put_dir``'s upload loop — raising on its ``n``-th call
    for a path containing ``under``; yields the list of those calls, each with the bucket's keys at
    that moment."""
    real = files.write_bytes
    calls: list[tuple[str, list[str]]] = []

    def write_bytes(path, data):
        if under in str(path):
            calls.append((str(path), objects(s3, bucket) if s3 else []))
            if len(calls) == n:
                raise StorageError(f"{path}: writing failed: connection reset (injected)")
        return real(path, data)

    files.write_bytes = write_bytes
    try:
        yield calls
    finally:
        files.write_bytes = real


def objects(s3, bucket: str) -> list[str]:
    """The bucket's keys but pyarrow's empty directory markers (``prefix/``)."""
    return [k for k in s3.keys(bucket) if not k.endswith("/")]


def export_run(run: str, model: Path, tag: str) -> None:
    """What ``train`` does at its end: the run's outputs staged, ``model/`` and ``tensorboard/``
    replaced whole, ``metrics.json`` last."""
    from xray_dist.model.artifacts import MODEL_DIR

    with storage.staged_output(run, replace=(MODEL_DIR, "tensorboard"), marker="metrics.json") as out:
        shutil.copytree(model, out / MODEL_DIR)
        (out / "tensorboard").mkdir()
        (out / "tensorboard" / f"events.{tag}").write_text(tag)
        (out / "metrics.json").write_text(json.dumps({"export": tag}))


def loaded(run: str) -> tuple[str, float]:
    """(weights digest, threshold) of the model the loader finds in ``run``."""
    from xray_dist.model.artifacts import load_run_model

    lm = load_run_model(run)
    return weights_digest(lm.model), lm.threshold


# ---- a run's model/ re-exported to object storage ----------------------------------------------------

@pytest.mark.slow
def test_a_failed_reexport_to_object_storage_leaves_the_previous_model_loadable(s3_server, two_models):
    (model_a, digest_a, thr_a), (model_b, digest_b, thr_b) = two_models["a"], two_models["b"]
    b = "commits-run"
    run = f"{s3_server.bucket(b)}/runs/r"

    export_run(run, model_a, "a")
    assert loaded(run) == (digest_a, thr_a)
    first = objects(s3_server, b)
    assert "runs/r/model/weights.h5" in first  # the first export goes to model/ itself

    # the second export's upload fails at its second PUT: one file of the new model is up by then
    with failing_put(2, "/runs/r/model", s3_server, b) as calls, pytest.raises(StorageError, match="injected"):
        export_run(run, model_b, "b")
    assert loaded(run) == (digest_a, thr_a)  # the previous export, whole
    assert len(calls) == 2
    (put1, _), (put2, keys_at_fault) = calls
    version = put1.split("/")[-2]
    assert version.startswith("model.v") and put2.split("/")[-2] == version  # both into one new version
    assert [k for k in keys_at_fault if k.startswith("runs/r/model.v")] == [f"runs/r/{version}/{put1.split('/')[-1]}"]
    assert objects(s3_server, b) == first  # its partial version removed, nothing else touched
    assert json.loads(s3_server.get(b, "runs/r/metrics.json")) == {"export": "a"}

    export_run(run, model_b, "b")  # the same export, now whole
    assert loaded(run) == (digest_b, thr_b)
    keys = objects(s3_server, b)
    versions = {k.split("/")[2] for k in keys if k.startswith("runs/r/model.v")}
    assert len(versions) == 1 and json.loads(s3_server.get(b, "runs/r/model.current")) == {"current": versions.pop()}
    assert not any(k.startswith("runs/r/model/") for k in keys)  # the superseded copy is gone
    assert json.loads(s3_server.get(b, "runs/r/metrics.json")) == {"export": "b"}
    events = [k for k in keys if k.startswith("runs/r/tensorboard") and "/events." in k]
    assert len(events) == 1 and events[0].endswith("/events.b")  # replaced whole too

    # from a versioned model: a failed upload (at the first PUT) keeps b, a whole one switches to a
    with failing_put(1, "/runs/r/model", s3_server, b) as calls, pytest.raises(StorageError, match="injected"):
        export_run(run, model_a, "a")
    assert len(calls) == 1 and loaded(run) == (digest_b, thr_b) and objects(s3_server, b) == keys
    export_run(run, model_a, "a")
    assert loaded(run) == (digest_a, thr_a)
    assert len({k.split("/")[2] for k in objects(s3_server, b) if k.startswith("runs/r/model.v")}) == 1


@pytest.mark.slow
def test_an_upload_that_is_not_whole_is_never_switched_to(s3_server, two_models, monkeypatch):
    """put_dir returning without error but an object missing (a store that lost a write): the
    check before the switch refuses it, naming what is absent."""
    (model_a, digest_a, thr_a), (model_b, _, _) = two_models["a"], two_models["b"]
    b = "commits-check"
    run = f"{s3_server.bucket(b)}/runs/r"
    export_run(run, model_a, "a")
    real = files.write_bytes
    monkeypatch.setattr(files, "write_bytes",
                        lambda p, d: None if str(p).endswith("/weights.h5") and "/model.v" in str(p) else real(p, d))
    with pytest.raises(StorageError, match=r"not whole \(1 of 2 files absent\)"):
        export_run(run, model_b, "b")
    monkeypatch.undo()
    assert loaded(run) == (digest_a, thr_a)
    assert not any(k.startswith("runs/r/model.v") or k.endswith(".current") for k in objects(s3_server, b))


@pytest.mark.slow
def test_an_export_reexported_to_object_storage_serves_the_previous_model_until_the_new_one_is_whole(
        s3_server, two_models, tmp_path):
    import tensorflow as tf

    from xray_dist.inference.export import export_model
    from xray_dist.model.artifacts import load_run_model, predict_arrays

    runs = {}
    for tag in ("a", "b"):
        runs[tag] = tmp_path / f"run_{tag}"
        shutil.copytree(two_models[tag][0], runs[tag] / "model")
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32), dtype=np.uint8)
    expected = {tag: predict_arrays(load_run_model(r), images) for tag, r in runs.items()}
    assert not np.allclose(expected["a"], expected["b"], atol=1e-4)
    b = "commits-export"
    out = f"{s3_server.bucket(b)}/served"

    def served() -> np.ndarray:
        with storage.local_copy(storage.current_dir(f"{out}/savedmodel")) as d:
            f = tf.saved_model.load(str(d)).signatures["serving_default"]
            return f(image=tf.constant(images))["probabilities"].numpy()

    assert export_model(runs["a"], out) == f"{out}/savedmodel"
    np.testing.assert_allclose(served(), expected["a"], atol=1e-5)
    with failing_put(3, "/served/savedmodel") as calls, pytest.raises(StorageError, match="injected"):
        export_model(runs["b"], out)
    np.testing.assert_allclose(served(), expected["a"], atol=1e-5)
    assert len(calls) == 3 and all("/served/savedmodel.v" in c for c, _ in calls)
    assert json.loads(s3_server.get(b, "served/serving.json"))["threshold"] == two_models["a"][2]
    path = export_model(runs["b"], out)
    assert path.startswith(f"{out}/savedmodel.v") and path == storage.current_dir(f"{out}/savedmodel")
    np.testing.assert_allclose(served(), expected["b"], atol=1e-5)
    assert json.loads(s3_server.get(b, "served/serving.json"))["threshold"] == two_models["b"][2]


# ---- the pointer, locally ----------------------------------------------------------------------------

class TestPointerLocally:
    def test_a_local_replace_of_a_directory_copied_from_object_storage_drops_its_pointer(self, tmp_path):
        run = tmp_path / "run"
        (run / "model.v00000000a1").mkdir(parents=True)
        (run / "model.v00000000a1" / "w").write_text("old")
        (run / "model.current").write_text('{"current": "model.v00000000a1"}')
        assert storage.current_dir(run / "model") == str(run / "model.v00000000a1")
        with storage.staged_output(run, replace=("model",)) as d:
            (d / "model").mkdir()
            (d / "model" / "w").write_text("new")
        assert storage.current_dir(run / "model") == str(run / "model")
        assert (run / "model" / "w").read_text() == "new" and sorted(p.name for p in run.iterdir()) == ["model"]

    @pytest.mark.parametrize("content", ['{"current": "../elsewhere"}', '{"current": "model.v1/../../x"}',
                                         '{"current": "other.v00000000a1"}', "not json", '["model.v00000000a1"]'])
    def test_a_pointer_that_names_no_version_is_refused_naming_it(self, tmp_path, content):
        (tmp_path / "model.current").write_text(content)
        with pytest.raises(StorageError, match=r"model\.current: not a pointer to a version of model/"):
            storage.current_dir(tmp_path / "model")


# ---- evaluate and the sweep's lock -------------------------------------------------------------------

HOLD = """
import sys, time
from xray_dist.infra.locks import TargetLock
with TargetLock(sys.argv[1], "xray-dist tune"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes it
"""


def test_evaluate_refuses_a_sweep_another_process_holds_and_leaves_best_json_as_it_was(tmp_path, capsys):
    from xray_dist.cli import app as cli

    sweep = tmp_path / "sweep"
    (sweep / "trials" / "t0").mkdir(parents=True)
    (sweep / "results.csv").write_text("trial\nt0\n")
    (sweep / "best.json").write_bytes(json.dumps({"model": str(sweep / "trials" / "t0"), "trial": "t0"},
                                                 indent=2).encode() + b"\n")
    before = (sweep / "best.json").read_bytes()
    cache = tmp_path / "cache"  # never reached while the sweep is held
    args = ["evaluate", "--model", str(sweep), "--cache", str(cache), "--bootstrap", "100"]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(sweep)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert f"pid {holder.pid}" in err and "xray-dist tune" in err and str(sweep) in err
        assert (sweep / "best.json").read_bytes() == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert holder.returncode == 0
    # once released, the same command gets past the lock (and stops at the missing cache)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "xray-dist tune" not in err and str(cache) in err
    assert (sweep / "best.json").read_bytes() == before
    assert not (sweep / ".xray_dist.lock").exists()  # evaluate's own lock released
