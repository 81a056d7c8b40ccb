"""predict's local engine: files decoded on every core while the model scores the chunk before,
in input order, bad files in their rows, and only a few chunks held whatever the number of files."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from xray_dist.inference import predict as predict_mod


def _files(synth_binary, tmp_path, n):
    files = [str(synth_binary.out / rel) for rel in sorted(synth_binary.labels)[:n]]
    for k, at in enumerate((0, 4, 7, len(files) + 2)):  # bad files first, last and at the chunk edges
        bad = tmp_path / f"bad{k}.dcm"
        bad.write_bytes(b"not a dicom file" * k)
        files.insert(at, str(bad))
    return files


def test_local_engine_scores_each_file_as_alone_in_input_order(two_worker_run, synth_binary, tmp_path):
    from xray_dist.data.dicom import load_image
    from xray_dist.model.artifacts import load_run_model, predict_arrays

    _, _, run = two_worker_run
    files = _files(synth_binary, tmp_path, 13)
    rows = predict_mod.predict_files(run, files, tmp_path / "p.csv", engine="local", batch_size=4,
                                     precision="float32")
    assert [r["path"] for r in rows] == [f.rsplit("/", 1)[1] for f in files]
    lm = load_run_model(run, "float32")
    for f, r in zip(files, rows):  # ground truth: each file read and scored by itself
        if "bad" in f:
            assert r["error"] and r["prediction"] == "", r
            continue
        assert r["error"] == ""
        p = predict_arrays(lm, load_image(f, lm.preprocess)[None])[0]
        assert float(r["p_finding"]) == pytest.approx(float(p[1]), abs=1e-5)


def test_files_decode_at_once_and_only_three_chunks_ahead(synth_binary, tmp_path, monkeypatch):
    """Two files are being decoded at the same moment (a barrier that only two threads inside
    load_image at once can pass), and while the caller holds chunk k no file past chunk k+3 has
    started: memory stays bounded by the chunk size, not the number of files."""
    from xray_dist.config import PreprocessSpec

    files = _files(synth_binary, tmp_path, 30)
    met = threading.Barrier(2, timeout=20)
    started: list[int] = []
    real = predict_mod.load_image
    lock = threading.Lock()

    def load(path, spec):
        with lock:
            started.append(files.index(path))
        if len(started) <= 2:
            met.wait()  # raises BrokenBarrierError if files decode one at a time
        return real(path, spec)

    monkeypatch.setattr(predict_mod, "load_image", load)
    spec = PreprocessSpec(image_size=32)
    seen = []
    for start, errors, good in predict_mod.decoded_batches(files, [f.rsplit("/", 1)[1] for f in files], spec,
                                                             "predict", 4, threads=2):
        time.sleep(0.3)  # a slow consumer (the model): decoding must not run ahead past three chunks
        with lock:
            assert max(started) < start + 4 * 4, (start, max(started))
        assert len(errors) == min(4, len(files) - start)
        assert all(start <= i < start + 4 for i, _ in good)
        seen += [i for i, _ in good]
        assert [bool(e) for e in errors] == ["bad" in f for f in files[start:start + 4]]
    assert seen == [i for i, f in enumerate(files) if "bad" not in f]
    assert all(img.shape == (32, 32) and img.dtype == np.uint8 for _, img in good)


def test_an_archive_is_read_with_at_most_its_connections(monkeypatch):
    monkeypatch.setattr(predict_mod.os, "sched_getaffinity", lambda _: set(range(64)), raising=False)
    files = [f"dicomweb+http://127.0.0.1:1/dicom-web/1/2/{i}.dcm" for i in range(100)]
    assert predict_mod.decode_threads(files) == predict_mod.dicomweb.CONNECTIONS
    assert predict_mod.decode_threads(["/a.dcm"] * 100) == 64
    assert predict_mod.decode_threads(["/a.dcm"]) == 1


def test_files_decode_while_the_model_loads_and_stop_when_it_cannot(two_worker_run, synth_binary, tmp_path,
                                                                   monkeypatch):
    """The local engine starts decoding before it loads the model: here the model's loading waits
    until a file has been read (it would time out if decoding waited for the model). A model that
    cannot load stops the decoding it started: no file starts after the error, and the error is
    the model's."""
    from xray_dist.errors import ModelSpecError

    _, _, run = two_worker_run
    files = _files(synth_binary, tmp_path, 30)
    started: list[str] = []
    first = threading.Event()
    real_read, real_load = predict_mod.load_image, predict_mod.load_run_model

    def read(path, spec):
        started.append(path)
        first.set()
        time.sleep(0.05)  # a slow file system: the files take longer than the model
        return real_read(path, spec)

    def load(*a, **k):
        assert first.wait(20), "no file was decoding while the model loaded"
        return real_load(*a, **k)

    monkeypatch.setattr(predict_mod, "load_image", read)
    monkeypatch.setattr(predict_mod, "load_run_model", load)
    monkeypatch.setattr(predict_mod, "decode_threads", lambda files: 2)  # fewer than the 12 reads queued
    rows = predict_mod.predict_files(run, files, tmp_path / "p.csv", engine="local", batch_size=4,
                                     precision="float32")
    assert len(rows) == len(files) and sorted(started) == sorted(files)

    def broken(*a, **k):
        assert first.wait(20)
        raise ModelSpecError("model/weights.h5: not a weights file")

    started.clear()
    first.clear()
    monkeypatch.setattr(predict_mod, "load_run_model", broken)
    with pytest.raises(ModelSpecError, match="not a weights file"):
        predict_mod.predict_files(run, files, tmp_path / "q.csv", engine="local", batch_size=4, precision="float32")
    n = len(started)
    time.sleep(0.5)
    assert len(started) == n and 0 < n < 3 * 4  # of the three chunks submitted ahead, the unstarted were cancelled
    assert not (tmp_path / "q.csv").exists()
