"""One writer at a time: the lock on a target, locally and on object storage, and two commands
started on one target at once."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xray_dist.infra import locks, storage
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
        with caplog.at_level(logging.WARNING, logger="xray_dist.infra.locks"):
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

    @pytest.mark.parametrize("content", [b"", b'{"host": "n'], ids=["empty", "cut-off"])
    def test_an_unreadable_young_lock_counts_as_held(self, target, content, monkeypatch, caplog):
        """Empty or unparsable (a create not yet written, or damage): held by an unknown holder
        while young; taken over once the file itself is older than the stale limit."""
        monkeypatch.setattr(locks, "STALE_S", 1.5)
        monkeypatch.setattr(locks, "HEARTBEAT_S", 0.5)
        storage.write_bytes(storage.join(target, locks.LOCK), content)
        written = time.time()
        for _ in range(2):
            with pytest.raises(LockedError, match="unknown holder"):
                locks.TargetLock(target, "xray-dist train").acquire()
        assert time.time() - written < locks.STALE_S  # refused while young, not because time ran out
        time.sleep(written + locks.STALE_S + 1.2 - time.time())  # S3's Last-Modified is in whole seconds
        with caplog.at_level(logging.WARNING, logger="xray_dist.infra.locks"):
            with locks.TargetLock(target, "xray-dist train") as lock:
                assert json.loads(storage.read_text(lock.path))["token"] == lock.me["token"]
        assert any("taking over" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)

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

    from xray_dist.cli.app import main

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
             "--batch-size", "8", "--cpus-per-worker", "0.5", "--address", ray_cluster.address,
             "--runner", "inprocess"]  # the lock is taken before either runner starts
    first = subprocess.Popen([sys.executable, "-m", "xray_dist.cli", *train], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    assert _wait_for_lock(str(run / locks.LOCK), first), first.communicate()[0][-2000:]
    assert main(train) == 2
    assert f"pid {first.pid}" in capsys.readouterr().err
    assert first.wait(timeout=400) == 0
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1


# ---- races: two commands that start together, many times ------------------------------------------
RACE_TRIES = 20


def _crashed_holder(pid: int) -> dict:
    """The lock a crashed command left: its process ``pid`` on this host is gone, its heartbeat is old."""
    return {"host": socket.gethostname(), "pid": pid, "command": "xray-dist prepare", "token": "crashed",
            "since": "2026-01-01T00:00:00+00:00", "heartbeat": time.time() - 3600}


def _racer(me: int, target: str, tries: int, delay_first_put: float, start, decided, done, results) -> None:
    """One command, ``tries`` times: acquire when the barrier opens, report, release when told."""
    logging.disable(logging.WARNING)  # the takeover warnings: one per try
    from xray_dist.infra import locks as child_locks
    from xray_dist.infra import s3lock
    from xray_dist.errors import LockedError as Locked

    state = {"puts": 0}
    if target.startswith("s3://"):
        s3lock.client()  # made before the race, as a command makes it before its lock
    if delay_first_put:
        def slow_first_put(request, **_):  # an SDK retry's back-off before this writer's first PUT lands
            state["puts"] += 1
            if state["puts"] == 1:
                time.sleep(delay_first_put)

        s3lock.client().meta.events.register("before-send.s3.PutObject", slow_first_put)
    for t in range(tries):
        state["puts"] = 0
        lock = child_locks.TargetLock(target, f"racer {me}")
        start.wait(timeout=60)
        try:
            lock.acquire()
            outcome = "held"
        except Locked:
            outcome = "refused"
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            outcome = f"{type(e).__name__}: {e}"
        results.put((t, me, outcome))
        decided.wait(timeout=60)
        if outcome == "held":
            lock.release()
        done.wait(timeout=60)


def _race(target: str, setup, delay_first_put: float = 0.0) -> list[list[str]]:
    """Two racer processes, :data:`RACE_TRIES` tries; ``setup()`` prepares the target before each.
    Returns each try's two outcomes (racer 0's, racer 1's)."""
    ctx = multiprocessing.get_context("spawn")
    start, decided, done = (ctx.Barrier(3) for _ in range(3))
    results = ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(i, target, RACE_TRIES, delay_first_put if i == 0 else 0.0,
                                              start, decided, done, results), daemon=True) for i in range(2)]
    for p in procs:
        p.start()
    outcomes = []
    try:
        for t in range(RACE_TRIES):
            setup()
            start.wait(timeout=120)
            got = sorted(results.get(timeout=60) for _ in range(2))
            assert [g[:2] for g in got] == [(t, 0), (t, 1)]
            outcomes.append([g[2] for g in got])
            decided.wait(timeout=60)
            done.wait(timeout=60)  # both released: the next setup finds the target free
            assert not storage.exists(storage.join(target, locks.LOCK)), f"try {t}: the winner left its lock"
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return outcomes


def _assert_one_holder_each_try(outcomes: list[list[str]]) -> None:
    assert len(outcomes) == RACE_TRIES
    unexpected = [o for o in outcomes if any(x not in ("held", "refused") for x in o)]
    assert not unexpected, unexpected[:3]
    two = sum(o.count("held") == 2 for o in outcomes)
    none = sum(o.count("held") == 0 for o in outcomes)
    assert (two, none) == (0, 0), f"{two} of {RACE_TRIES} tries had two holders, {none} had none"


class TestRaces:
    """Two commands started together behind a barrier, :data:`RACE_TRIES` times; the lock file is
    the only thing they share. Ground truth: each racer's own report of ``acquire()``."""

    def test_two_commands_against_a_crashed_holders_lock(self, tmp_path):
        target = str(tmp_path / "run")
        lock = storage.join(target, locks.LOCK)
        pid = dead_pid()
        _assert_one_holder_each_try(_race(target, lambda: storage.write_json(lock, _crashed_holder(pid))))
        assert sorted(p.name for p in Path(target).iterdir()) == []  # no moved-aside or half-made lock left

    def test_two_commands_against_no_lock(self, tmp_path):
        target = str(tmp_path / "run")
        _assert_one_holder_each_try(_race(target, lambda: None))
        assert sorted(p.name for p in Path(target).iterdir()) == []

    @pytest.mark.parametrize("setup", ["crashed holder", "no lock"])
    def test_on_s3_with_one_put_delayed_by_a_retry(self, s3_server, setup):
        """The first PUT of racer 0 sleeps 1 s before it is sent (as an SDK retry's back-off would):
        by then racer 1 has written and checked; racer 0's late PUT must not win too."""
        target = f"{s3_server.bucket(f'race-{time.time_ns() % 10**9}')}/run"
        lock = storage.join(target, locks.LOCK)
        pid = dead_pid()
        crashed = setup == "crashed holder"
        outcomes = _race(target, lambda: storage.write_json(lock, _crashed_holder(pid)) if crashed else None,
                         delay_first_put=1.0)
        _assert_one_holder_each_try(outcomes)
        late = sum(o == ["refused", "held"] for o in outcomes)  # the delay bit: the late PUT came second
        assert late >= RACE_TRIES // 2, outcomes


# ---- a holder paused past the stale limit -----------------------------------------------------------
HOLDER = r"""
import sys, time
from xray_dist.infra import locks
target, mode, ticks = sys.argv[1:4]
with locks.TargetLock(target, "xray-dist train") as lock:
    print("HELD", lock.me["token"], flush=True)
    if mode == "write":  # a command writing its outputs, until it is done or stopped
        with open(ticks, "a") as f:
            while True:
                f.write(f"{time.time()}\n")
                f.flush()
                time.sleep(0.05)
    sys.stdin.readline()  # hold until told to finish
"""
PAUSE_ENV = {"XRAY_DIST_LOCK_HEARTBEAT_S": "0.4", "XRAY_DIST_LOCK_STALE_S": "2"}


def _holder_process(target: str, mode: str, ticks: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, target, mode, str(ticks)], env={**os.environ, **PAUSE_ENV},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _held(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    assert line.startswith("HELD "), (line, proc.stderr.read() if proc.poll() is not None else "")
    return line.split()[1]


def test_a_paused_holder_stops_when_it_finds_its_lock_taken_over(target, tmp_path, monkeypatch):
    """SIGSTOP a holder that keeps writing; another command takes its lock over after the stale
    limit; on SIGCONT the first one's heartbeat finds the lock someone else's and ends its command
    (exit 2, one line), within one heartbeat, leaving the new holder's lock as it is."""
    beat, stale = float(PAUSE_ENV["XRAY_DIST_LOCK_HEARTBEAT_S"]), float(PAUSE_ENV["XRAY_DIST_LOCK_STALE_S"])
    lock = storage.join(target, locks.LOCK)
    ticks = tmp_path / "ticks"
    old = _holder_process(target, "write", ticks)
    new = None
    try:
        old_token = _held(old)
        time.sleep(2 * beat)
        os.kill(old.pid, signal.SIGSTOP)
        stopped = time.time()
        monkeypatch.setattr(locks, "STALE_S", stale)
        monkeypatch.setattr(locks, "HEARTBEAT_S", beat)
        with pytest.raises(LockedError, match=f"pid {old.pid}"):  # before the stale limit: still held
            locks.TargetLock(target, "xray-dist train").acquire()
        assert time.time() - stopped < stale, "too slow to check the refusal before the stale limit"
        time.sleep(max(0.0, stopped + stale + 0.5 - time.time()))
        new = _holder_process(target, "hold", tmp_path / "unused")
        new_token = _held(new)
        assert json.loads(storage.read_text(lock))["token"] == new_token != old_token
        ticks_before = ticks.read_text().count("\n")
        resumed = time.time()
        os.kill(old.pid, signal.SIGCONT)
        _, err = old.communicate(timeout=30)
        ended = time.time()
        assert old.returncode == 2, err[-2000:]
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1 and f"lost the lock on {target}" in lines[0] and "taken over by" in lines[0] \
            and f"pid {new.pid}" in lines[0], err[-2000:]
        assert ended - resumed < beat + 1.5  # noticed at its first heartbeat after the pause
        last_tick = float(ticks.read_text().split()[-1])
        assert ticks.read_text().count("\n") > ticks_before  # it did run again (the test is not vacuous) ...
        assert last_tick - resumed < beat + 1.0  # ... and stopped writing within a heartbeat
        first = json.loads(storage.read_text(lock))
        time.sleep(3 * beat)
        later = json.loads(storage.read_text(lock))
        assert first["token"] == later["token"] == new_token  # the new holder's lock, untouched ...
        assert later["heartbeat"] > first["heartbeat"]  # ... and still beating
        new.stdin.write("done\n")
        new.stdin.flush()
        assert new.wait(timeout=30) == 0
        assert not storage.exists(lock)
    finally:
        for p in (old, new):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()


def test_a_holder_whose_lock_is_deleted_stops(tmp_path):
    """The lock deleted under a running command (by hand, or by a cleanup): the command stops at its
    next heartbeat rather than writing on unlocked."""
    target = str(tmp_path / "run")
    holder = _holder_process(target, "write", tmp_path / "ticks")
    try:
        _held(holder)
        os.unlink(os.path.join(target, locks.LOCK))
        _, err = holder.communicate(timeout=30)
        assert holder.returncode == 2 and f"lost the lock on {target}" in err and "was deleted" in err, err[-2000:]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
