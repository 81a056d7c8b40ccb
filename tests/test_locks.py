"""One writer at a time: the lock on a target, locally and on object storage, and two commands
started on one target at once."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest

from xray_dist import locks, storage
from xray_dist.errors import LockedError


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(params=["local", "s3"])
def target(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    s3 = request.getfixturevalue("s3_server")
    return f"{s3.bucket(f'locks-{time.time_ns() % 10**9}')}/run"


class TestTargetLock:
    def test_second_holder_fails_at_once_naming_the_first(self, target):
        with locks.TargetLock(target, "xray-dist train"):
            t0 = time.time()
            with pytest.raises(LockedError) as e:
                locks.TargetLock(target, "xray-dist train").acquire()
            assert time.time() - t0 < 10
            held = json.loads(storage.read_text(storage.join(target, locks.LOCK)))
            msg = str(e.value)
            assert f"pid {held['pid']}" in msg and held["host"] in msg and held["since"] in msg
            assert "xray-dist train" in msg
        assert not storage.exists(storage.join(target, locks.LOCK))  # released
        with locks.TargetLock(target, "xray-dist train"):  # and free again
            pass

    def test_a_dead_holder_on_this_host_is_taken_over(self, target, caplog):
        import socket

        stale = {"host": socket.gethostname(), "pid": dead_pid(), "command": "xray-dist prepare", "token": "old",
                 "since": "2026-01-01T00:00:00+00:00", "heartbeat": time.time()}
        storage.write_json(storage.join(target, locks.LOCK), stale)
        with caplog.at_level(logging.WARNING, logger="xray_dist.locks"):
            with locks.TargetLock(target, "xray-dist prepare") as lock:
                assert json.loads(storage.read_text(lock.path))["token"] == lock.me["token"]
        assert any("taking over" in r.getMessage() and "is gone" in r.getMessage() for r in caplog.records)

    def test_a_silent_holder_elsewhere_is_taken_over_only_when_its_heartbeat_stops(self, target, monkeypatch):
        alive = {"host": "another-node", "pid": 1, "command": "xray-dist tune", "token": "x",
                 "since": "2026-01-01T00:00:00+00:00", "heartbeat": time.time()}
        storage.write_json(storage.join(target, locks.LOCK), alive)
        with pytest.raises(LockedError, match="another-node"):
            locks.TargetLock(target, "xray-dist tune").acquire()
        storage.write_json(storage.join(target, locks.LOCK), {**alive, "heartbeat": time.time() - 2 * locks.STALE_S})
        with locks.TargetLock(target, "xray-dist tune"):
            pass

    def test_heartbeat_refreshes_the_lock(self, target, monkeypatch):
        monkeypatch.setattr(locks, "HEARTBEAT_S", 0.2)
        with locks.TargetLock(target, "xray-dist train") as lock:
            first = json.loads(storage.read_text(lock.path))["heartbeat"]
            time.sleep(1.5)
            assert json.loads(storage.read_text(lock.path))["heartbeat"] > first


def _wait_for_lock(path, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if storage.exists(path):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_two_prepares_and_two_trains_on_one_target(ray_cluster, synth_binary, tmp_path, capsys):
    """The second command fails at once naming the first; the first finishes, its outputs whole."""
    import pyarrow.parquet as pq

    from xray_dist.cli import main

    cache = tmp_path / "cache"
    prepare = ["prepare", str(synth_binary.out), "--labels", str(synth_binary.labels_csv), "--out", str(cache),
               "--image-size", "32", "--address", ray_cluster.address]
    first = subprocess.Popen([sys.executable, "-m", "xray_dist.cli", *prepare], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    assert _wait_for_lock(str(cache / locks.LOCK), first), first.communicate()[0][-2000:]
    assert main(prepare) == 2
    err = capsys.readouterr().err
    assert f"pid {first.pid}" in err and "xray-dist prepare" in err
    assert first.wait(timeout=300) == 0
    manifest = pq.read_table(cache / "manifest.parquet").column("path").to_pylist()
    assert len(manifest) == len(set(manifest)) == len(synth_binary.files)  # each file once
    assert not (cache / locks.LOCK).exists()

    run = tmp_path / "run"
    train = ["train", "--cache", str(cache), "--out", str(run), "--epochs", "1", "--weights", "none",
             "--batch-size", "8", "--cpus-per-worker", "0.5", "--address", ray_cluster.address]
    first = subprocess.Popen([sys.executable, "-m", "xray_dist.cli", *train], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    assert _wait_for_lock(str(run / locks.LOCK), first), first.communicate()[0][-2000:]
    assert main(train) == 2
    assert f"pid {first.pid}" in capsys.readouterr().err
    assert first.wait(timeout=400) == 0
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1
