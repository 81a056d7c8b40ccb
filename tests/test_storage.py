"""The storage layer against a real S3 server (moto) and the local disk: URIs never become local
directories, writes are whole or absent, bad locations fail fast with exit 2 and the URI named."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from xray_dist.infra import files, storage
from xray_dist.errors import StorageError


def scheme_dirs(*roots: Path) -> list[Path]:
    """Every local directory named like a URI scheme (``s3:``, ``gs:``…) under ``roots``."""
    found = []
    for root in roots:
        for dirpath, dirnames, _ in os.walk(root):
            found += [Path(dirpath, d) for d in dirnames if d.endswith(":")]
    return found


class TestPaths:
    def test_uri_or_local(self, tmp_path):
        assert storage.is_uri("s3://b/k") and storage.is_uri("gs://b/k")
        assert not storage.is_uri(str(tmp_path)) and not storage.is_uri("file:///tmp/x")
        assert storage.absolute("s3://b/k/") == "s3://b/k"
        assert storage.absolute("rel") == str(Path("rel").resolve())
        assert storage.join("s3://b/k", "a", "b.json") == "s3://b/k/a/b.json"
        assert storage.join(str(tmp_path), "a") == str(tmp_path / "a")
        assert storage.name("s3://b/runs/r1/") == "r1" and storage.parent("s3://b/runs/r1") == "s3://b/runs"

    def test_inside(self, tmp_path):
        assert storage.inside("s3://b/data", "x/../y.dcm") == "y.dcm"
        assert storage.inside("s3://b/data", "../secret.dcm") is None
        assert storage.inside("s3://b/data", "/etc/passwd") is None
        (tmp_path / "d").mkdir()
        os.symlink("/etc/hostname", tmp_path / "d" / "link")
        assert storage.inside(str(tmp_path / "d"), "link") is None  # a symlink leading out
        assert storage.inside(str(tmp_path / "d"), "a/b") == "a/b"

    def test_unknown_scheme_is_a_storage_error(self):
        with pytest.raises(StorageError, match="foo://x/y"):
            storage.filesystem("foo://x/y")

    def test_local_write_is_whole_or_absent(self, tmp_path, monkeypatch):
        target = tmp_path / "sub" / "metrics.json"
        storage.write_text(target, "old")

        def broken(self, data):  # the disk fills up half-way through the write
            with open(self, "wb") as f:
                f.write(data[:3])
            raise OSError("No space left on device")

        monkeypatch.setattr(Path, "write_bytes", broken)
        with pytest.raises(OSError):
            storage.write_text(target, "new and longer")
        monkeypatch.undo()
        assert target.read_text() == "old"
        assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]  # no temporary left behind


class TestS3:
    def test_round_trip_listing_and_delete(self, s3_server):
        root = s3_server.bucket("roundtrip") + "/a"
        storage.write_text(root + "/x/one.txt", "1")
        storage.write_bytes(root + "/x/y/two.bin", b"\0\1")
        storage.write_text(root + "/.hidden", "h")
        assert storage.read_text(root + "/x/one.txt") == "1"
        assert [e.rel for e in storage.list_files(root)] == [".hidden", "x/one.txt", "x/y/two.bin"]
        assert [e.size for e in storage.list_files(root + "/x")] == [1, 2]
        assert storage.is_dir(root + "/x") and storage.is_file(root + "/x/one.txt")
        assert not storage.exists(root + "/nothing")
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(root + "/nothing")
        storage.delete_dir(root + "/x")
        # (pyarrow keeps an empty "a/" directory marker for the parent: not an object of ours)
        assert [k for k in s3_server.keys("roundtrip") if not k.endswith("/")] == ["a/.hidden"]

    def test_put_dir_writes_the_marker_last(self, s3_server, tmp_path):
        src = tmp_path / "ckpt"
        (src / "sub").mkdir(parents=True)
        for name in ("state.json", "weights.h5", "sub/z.npz"):
            (src / name).write_text(name)
        dest = s3_server.bucket("putdir") + "/epoch_0001"
        order = []
        real = files.write_bytes  # put_dir looks it up in files
        try:
            files.write_bytes = lambda p, d: (order.append(storage.name(p)), real(p, d))
            storage.put_dir(src, dest, marker="state.json")
        finally:
            files.write_bytes = real
        assert order[-1] == "state.json" and sorted(order) == ["state.json", "weights.h5", "z.npz"]
        with storage.local_copy(dest) as d:
            assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()) == \
                ["state.json", "sub/z.npz", "weights.h5"]

    def test_staged_output_uploads_only_on_success(self, s3_server):
        dest = s3_server.bucket("staged") + "/run"
        with pytest.raises(RuntimeError):
            with storage.staged_output(dest) as d:
                (d / "metrics.json").write_text("{}")
                raise RuntimeError("export failed")
        assert s3_server.keys("staged") == []
        with storage.staged_output(dest) as d:
            (d / "metrics.json").write_text("{}")
        assert s3_server.keys("staged") == ["run/metrics.json"]

    def test_missing_bucket_names_it(self, s3_server):
        with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
            storage.check_location("s3://no-such-bucket/cache")

    def test_local_file_downloads_once_and_again_when_changed(self, s3_server):
        uri = s3_server.bucket("weights") + "/w.h5"
        storage.write_bytes(uri, b"first")
        a = storage.local_file(uri)
        assert a.read_bytes() == b"first" and storage.local_file(uri) == a
        time.sleep(1.1)  # S3 modification times have one-second resolution
        storage.write_bytes(uri, b"second!")
        assert storage.local_file(uri).read_bytes() == b"second!"


def _run_cli(args: list[str], env: dict, cwd: Path, timeout: int = 120):
    import subprocess
    import sys

    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "xray_dist.cli", *args], env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=timeout)
    return p, time.time() - t0


class TestCommandsOnS3:
    def test_synth_and_preview(self, s3_server, tmp_path, monkeypatch):
        """Commands without Ray: synth writes into the bucket, preview reads from it and writes to it."""
        import io

        import numpy as np
        from PIL import Image

        from xray_dist.cli.app import main
        from xray_dist.config import PreprocessSpec
        from xray_dist.data.dicom import load_image

        monkeypatch.chdir(tmp_path)
        root = s3_server.bucket("synth-preview")
        assert main(["synth", f"{root}/syn", "--patients", "2", "--images-per-patient", "2", "--size", "64"]) == 0
        keys = s3_server.keys("synth-preview", "syn/")
        assert "syn/labels.csv" in keys and len([k for k in keys if k.endswith(".dcm")]) == 4
        first = next(k for k in keys if k.endswith(".dcm"))
        assert main(["preview", f"{root}/{first}", "--out", f"{root}/p.png", "--size", "32"]) == 0
        png = np.asarray(Image.open(io.BytesIO(s3_server.get("synth-preview", "p.png"))))
        local = tmp_path / "f.dcm"
        local.write_bytes(s3_server.get("synth-preview", first))
        np.testing.assert_array_equal(png, load_image(local, PreprocessSpec(image_size=32)))
        assert main(["demo", "--out", f"{root}/demo"]) == 2  # the demo is local by definition
        assert not scheme_dirs(tmp_path) and not any(p.name != "f.dcm" for p in tmp_path.iterdir())


class TestBadLocations:
    """Each command refuses an unusable location at once: exit 2, one line naming the URI, nothing written."""

    def test_unreachable_endpoint(self, tmp_path, s3_server):
        from conftest import free_port

        env = dict(os.environ, AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")  # nothing listens there
        for args in (["train", "--cache", "s3://cache-bucket/c", "--out", "s3://runs-bucket/r1", "--weights", "none"],
                     ["prepare", "s3://data-bucket/dicoms", "--out", str(tmp_path / "cache")]):
            p, seconds = _run_cli(args, env, tmp_path)
            assert p.returncode == 2, p.stderr
            assert seconds < 60
            err = [line for line in p.stderr.splitlines() if "error:" in line]
            assert len(err) == 1 and "cannot reach the object store" in err[0], p.stderr
            assert "s3://" in err[0] and "Traceback" not in p.stderr
        assert not scheme_dirs(tmp_path) and not (tmp_path / "cache").exists()

    def test_missing_bucket_and_unknown_scheme(self, tmp_path, s3_server, monkeypatch):
        from xray_dist.cli.app import main

        monkeypatch.chdir(tmp_path)
        if True:
            assert main(["train", "--cache", "s3://nonexistent-cache/c", "--out", "s3://nonexistent-runs/r",
                         "--weights", "none"]) == 2
            assert main(["prepare", "foo://bucket/data", "--out", "s3://nonexistent-runs/c"]) == 2
            assert main(["report", "s3://nonexistent-runs/r", "--out", "s3://nonexistent-runs/r.html"]) == 2
        assert not scheme_dirs(tmp_path) and not any(tmp_path.iterdir())

    def test_error_lines_name_the_uri(self, tmp_path, s3_server, capsys):
        from xray_dist.cli.app import main

        assert main(["train", "--cache", "s3://nonexistent-cache/c", "--out", str(tmp_path / "r"),
                     "--weights", "none"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["xray-dist train: error: s3://nonexistent-cache/c: bucket 'nonexistent-cache' does not exist "
                       "(create it first)"]
        assert not (tmp_path / "r").exists()


# ---- end to end on object storage --------------------------------------------------------------------

def files_with(needle: bytes, root: Path) -> tuple[int, list[str]]:
    """(how many regular files there are under ``root``, those holding ``needle``)."""
    n, hits = 0, []
    for dirpath, _, names in os.walk(root):
        for name in names:
            f = Path(dirpath, name)
            if f.is_symlink() or not f.is_file():
                continue
            n += 1
            try:
                if needle in f.read_bytes():
                    hits.append(str(f))
            except OSError:  # a file Ray removed while the walk went on
                pass
    return n, hits


def _history(csv_text: str) -> list[dict]:
    import csv
    import io

    return list(csv.DictReader(io.StringIO(csv_text)))


@pytest.mark.slow
def test_every_path_on_object_storage(ray_cluster, s3_server, worker_node_temp_dir, tmp_path, monkeypatch, capfd):
    """prepare → train (2 workers on 2 nodes that share no directory) → resume → predict → explain →
    tune → evaluate → report → export, with every path an ``s3://`` URI of the moto server; the S3
    secret appears in no object, no printed line and no log file (the commands', Ray's on both nodes)."""
    import json

    import tf_keras as keras

    from xray_dist.cli.app import main
    from xray_dist.data.synth import synthesize

    monkeypatch.chdir(tmp_path)
    logs = Path(os.environ["XRAY_DIST_LOG_DIR"])
    logs_before = set(logs.glob("*.log"))
    b = "xray-e2e"
    bucket = s3_server.bucket(b)
    syn = synthesize(tmp_path / "synth", patients=24, images_per_patient=2, size=64, seed=5)
    (syn.out / "corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(200))  # a preamble, then garbage
    with open(syn.labels_csv, "a") as f:
        f.write("corrupt.dcm,finding\nmissing.dcm,normal\n")
    s3_server.upload_dir(syn.out, b, "data")
    # the base-weights file the run starts from: written by this test, read from the bucket
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(
        str(tmp_path / "vgg16_notop.h5"))
    s3_server.client.upload_file(str(tmp_path / "vgg16_notop.h5"), b, "weights/vgg16_notop.h5")

    data, cache, run = f"{bucket}/data", f"{bucket}/cache", f"{bucket}/runs/r1"
    assert main(["prepare", data, "--labels", f"{data}/labels.csv", "--out", cache, "--image-size", "32",
                 "--seed", "3", "--test-fraction", "0.25"]) == 0
    report = json.loads(s3_server.get(b, "cache/prepare_report.json"))
    assert report["found"] == len(syn.files) + 1 == report["ok"] + len(report["quarantined"])
    assert [q["path"] for q in report["quarantined"]] == ["corrupt.dcm"]
    assert [m["path"] for m in report["missing"]] == ["missing.dcm"]
    assert {"cache/manifest.parquet", "cache/preprocess.json", "cache/images/_COMPLETE.json"} <= set(s3_server.keys(b))

    train = ["train", "--cache", cache, "--out", run, "--batch-size", "8", "--lr", "1e-4", "--weights",
             f"{bucket}/weights/vgg16_notop.h5", "--unfreeze-blocks", "1", "--num-workers", "2",
             "--cpus-per-worker", "0.5", "--placement-strategy", "STRICT_SPREAD"]
    assert main([*train, "--epochs", "1"]) == 0
    first = _history(s3_server.get(b, "runs/r1/history.csv").decode())
    ranks = [json.loads(s3_server.get(b, f"runs/r1/workers/rank{r}.json")) for r in (0, 1)]
    assert ranks[0]["node_id"] != ranks[1]["node_id"]  # one worker per node, reading the cache from the bucket
    assert any(k.startswith("runs/r1/ray/train/checkpoint_") for k in s3_server.keys(b, "runs/r1/ray/"))
    assert main([*train, "--epochs", "2"]) == 0  # more epochs: resumes from the bucket's checkpoint
    second = _history(s3_server.get(b, "runs/r1/history.csv").decode())
    assert [int(h["epoch"]) for h in second] == [1, 2]
    assert [h["epoch_seconds"] for h in second[:1]] == [h["epoch_seconds"] for h in first]  # not retrained
    assert json.loads(s3_server.get(b, "runs/r1/metrics.json"))["epochs"] == 2

    assert main(["predict", "--model", run, data, "--out", f"{bucket}/out/preds.csv"]) == 0
    preds = _history(s3_server.get(b, "out/preds.csv").decode())
    assert len(preds) == len(syn.files) + 1  # one row per input file, the corrupt one included
    bad = [r for r in preds if r["error"]]
    assert [r["path"] for r in bad] == ["corrupt.dcm"]  # named inside the prefix, as the cache names it
    assert bad[0]["error"] == report["quarantined"][0]["reason"]  # the same reason prepare gave
    assert all(r["prediction"] in ("normal", "finding") and r["path"] in syn.labels for r in preds if not r["error"])

    one = f"{data}/{sorted(syn.labels)[0]}"
    assert main(["explain", "--model", run, one, f"{data}/corrupt.dcm", "--out", f"{bucket}/out/explain"]) == 0
    assert {"out/explain/explain.csv"} <= set(s3_server.keys(b, "out/explain/"))
    assert len([k for k in s3_server.keys(b, "out/explain/") if k.endswith(".png")]) == 1

    sweep = f"{bucket}/sweeps/s1"
    assert main(["tune", "--cache", cache, "--out", sweep, "--epochs", "1", "--weights", "none", "--combos",
                 "0:2:0,8:2:0", "--lr", "1e-3,1e-3", "--scheduler", "fifo", "--batch-size", "8"]) == 0
    rows = _history(s3_server.get(b, "sweeps/s1/results.csv").decode())
    assert sorted(r["status"] for r in rows) == ["completed", "completed"], rows
    assert all(r["model"].startswith(f"{sweep}/trials/") and r["shared_features"] == "True" for r in rows)
    best = json.loads(s3_server.get(b, "sweeps/s1/best.json"))
    best_key = best["model"][len(bucket) + 1:]
    assert f"{best_key}/model/weights.h5" in s3_server.keys(b, best_key)  # the best trial's full model
    assert any(k.startswith("sweeps/s1/sweep/") for k in s3_server.keys(b, "sweeps/s1/"))  # Tune's own state
    assert any(k.startswith("cache/features/") and k.endswith("meta.json") for k in s3_server.keys(b, "cache/"))

    # the sweep's best trial scored once on the held-out test patients: cache, sweep and outputs in the bucket
    assert main(["evaluate", "--model", sweep, "--cache", cache, "--bootstrap", "100"]) == 0
    ev = json.loads(s3_server.get(b, "sweeps/s1/evaluation/test/metrics.json"))
    assert ev["split"] == "test" and ev["model"] == best["model"]
    assert ev["images"] == report["splits"]["test"]["images"] > 0
    assert {"sweeps/s1/evaluation/test/scores.parquet", "sweeps/s1/evaluation/test/roc.png"} <= set(
        s3_server.keys(b, "sweeps/s1/evaluation/"))
    assert json.loads(s3_server.get(b, "sweeps/s1/best.json"))["test"]["auc_abnormal"] == ev["auc_abnormal"]

    assert main(["report", sweep, "--out", f"{bucket}/out/report.html"]) == 0
    html = s3_server.get(b, "out/report.html").decode()
    assert "corrupt.dcm" in html and "Best trial" in html and "Held-out test" in html
    assert main(["export", "--model", run, "--out", f"{bucket}/out/export"]) == 0
    exported = s3_server.keys(b, "out/export/")
    assert {"out/export/model_spec.json", "out/export/serving.json"} <= set(exported)
    assert any(k.startswith("out/export/savedmodel/") and k.endswith("saved_model.pb") for k in exported)

    # nothing of it went to a local directory named after the scheme, on either node
    assert not scheme_dirs(tmp_path, worker_node_temp_dir, Path("/tmp/ray"), Path(__file__).resolve().parents[1])
    # and the credentials are nowhere: not in an object written, not on the terminal
    out = capfd.readouterr()
    assert s3_server.secret not in out.out + out.err
    for key in s3_server.keys(b):
        assert s3_server.secret.encode() not in s3_server.get(b, key), key
    # nor in a log: the commands' own log files (outputs on S3 log to XRAY_DIST_LOG_DIR), Ray's session
    # logs on the head (/tmp/ray/session_*) and everything under the worker node's Ray directory
    # this test's commands' files (a log file is opened at its first line: report writes none)
    written = {f.name.split("-")[0] for f in set(logs.glob("*.log")) - logs_before}
    assert {"prepare", "train", "predict", "explain", "tune", "evaluate", "export"} <= written, written
    head_logs = Path(ray_cluster.head_node.get_session_dir_path()) / "logs"
    assert head_logs.resolve().parent.parent == Path("/tmp/ray").resolve()
    scanned = {}
    for root in (logs, head_logs, Path("/tmp/ray/session_latest/logs"), worker_node_temp_dir):
        scanned[str(root)] = files_with(s3_server.secret.encode(), root)
    assert all(n for n, _ in scanned.values()), {k: n for k, (n, _) in scanned.items()}  # each place holds files
    assert [hit for _, hits in scanned.values() for hit in hits] == []


@pytest.mark.slow
def test_worker_killed_with_checkpoints_in_object_storage(two_worker_run, s3_server, tmp_path, same_run, read_h5):
    """One of two train workers (one per node) killed once a checkpoint is in the bucket: the run
    restarts from it, counts each epoch once, and ends as the uninterrupted run with the same
    settings (``two_worker_run``) ended — optimizer, dropout and data order restored on both nodes."""
    from test_train import assert_restarted, kill_this_runs_worker

    from xray_dist.config import TrainConfig
    from xray_dist.training.driver import train

    done, _, done_dir = two_worker_run
    b = "xray-kill"
    out = f"{s3_server.bucket(b)}/runs/kill"
    def worker():
        try:
            return json.loads(s3_server.get(b, "runs/kill/workers/rank1.json"))  # the worker node's
        except Exception:  # noqa: BLE001 - not written yet
            return None

    def checkpoints():
        return len({k.split("/checkpoint_")[1].split("/")[0] for k in s3_server.keys(b, "runs/kill/ray/train/")
                    if "/checkpoint_" in k})

    t, killed = kill_this_runs_worker(checkpoints, worker)
    res = train(TrainConfig(**{**done.metrics["config"], "out": out}))
    t.join(timeout=5)
    assert_restarted(killed, worker(), 4)
    history = _history(s3_server.get(b, "runs/kill/history.csv").decode())
    assert [int(h["epoch"]) for h in history] == [1, 2, 3, 4]
    assert res.metrics["epochs"] == 4 and res.metrics["complete"]
    weights = tmp_path / "weights.h5"
    weights.write_bytes(s3_server.get(b, "runs/kill/model/weights.h5"))
    same_run((read_h5(done_dir / "model" / "weights.h5"), done.history), (read_h5(weights), history))


class TestLocalStaging:
    def test_outputs_move_in_whole_or_not_at_all(self, tmp_path):
        out = tmp_path / "run"
        with storage.staged_output(out, replace=("model",), marker="metrics.json") as d:
            (d / "model").mkdir()
            (d / "model" / "weights.h5").write_text("v1")
            (d / "metrics.json").write_text('{"v": 1}')
        assert (out / "model" / "weights.h5").read_text() == "v1"
        with pytest.raises(OSError):
            with storage.staged_output(out, replace=("model",), marker="metrics.json") as d:
                (d / "model").mkdir()
                (d / "model" / "weights.h5").write_text("v2 cut off")
                raise OSError("No space left on device")
        assert (out / "model" / "weights.h5").read_text() == "v1"  # the previous export, whole
        assert (out / "metrics.json").read_text() == '{"v": 1}'
        assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model"]  # no staging left behind
        with storage.staged_output(out, replace=("model",)) as d:
            (d / "model").mkdir()
            (d / "model" / "top_weights.h5").write_text("v3")
        assert [p.name for p in (out / "model").iterdir()] == ["top_weights.h5"]  # replaced whole: no stale file
