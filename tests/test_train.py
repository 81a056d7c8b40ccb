"""Training on real Ray: two workers on a two-node cluster, the multi-device path on logical CPUs,
a worker killed mid-run, resuming, predict agreeing with validation, and a `ray job submit`."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from xray_dist.config import TrainConfig
from xray_dist.data.cache import load_manifest
from xray_dist.results.metrics import auroc

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def cfg_for(cache, out, **kw) -> TrainConfig:
    base = dict(cache=str(cache), out=str(out), epochs=3, batch_size=8, lr=1e-4, weights="none",
                unfreeze_blocks=5, num_workers=1, cpus_per_worker=0.5)
    base.update(kw)
    return TrainConfig(**base)


def read_history(run) -> list[dict]:
    with open(Path(run) / "history.csv") as f:
        return list(csv.DictReader(f))


def test_two_workers_on_two_nodes_learn(two_worker_run):
    res, _, out = two_worker_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["val_auc_abnormal"] >= 0.9 and m["val_auc"] >= 0.9
    final = m["final"]
    assert final["world_size"] == 2
    workers = [json.loads((out / "workers" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert workers[0]["node_id"] != workers[1]["node_id"]  # one worker on each node
    assert {w["strategy"] for w in workers} == {"CollectiveAllReduceStrategy"}
    assert final["replicas"] == 2 and final["global_batch"] == 16
    assert [int(h["epoch"]) for h in read_history(out)] == [1, 2, 3, 4]
    for name in ("metrics.json", "history.csv", "training_curves.png", "roc.png", "model/weights.h5",
                 "model/model_spec.json", "config.json"):
        assert (out / name).is_file(), name
    assert m["trainable_parameters"] > 14_000_000 and m["images_per_s"] > 0
    assert {"sensitivity", "specificity", "val_auc_normal", "val_auc_finding"} <= set(m["best"])


def test_tensorboard_scalars_match_history(two_worker_run):
    import tensorflow as tf

    _, _, out = two_worker_run
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    seen: dict[tuple[str, int], float] = {}
    for e in tf.compat.v1.train.summary_iterator(str(events[0])):
        for v in e.summary.value:
            seen[(v.tag, e.step)] = float(tf.make_ndarray(v.tensor))
    for row in read_history(out):
        for key in ("loss", "val_loss", "val_auc_abnormal", "sensitivity"):
            assert seen[(key, int(row["epoch"]))] == pytest.approx(float(row[key]), rel=1e-5), key


def test_nothing_identifying_in_run_outputs(two_worker_run, synth_binary):
    _, _, out = two_worker_run
    secrets = set(synth_binary.patients.values()) | {f"Synthetic^Patient{i:04d}" for i in range(40)}
    blob = "\n".join(f.read_bytes().decode("latin-1") for f in out.rglob("*") if f.is_file())
    assert not sorted(s for s in secrets if s in blob)


def test_predict_agrees_with_validation(two_worker_run, synth_binary, tmp_path):
    from xray_dist.cli import app as cli

    _, cache, out = two_worker_run
    manifest = load_manifest(cache).to_pandas()
    val = manifest[manifest.split == "val"]
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"nope")
    files = [str(synth_binary.out / p) for p in val.path] + [str(bad)]
    assert cli.main(["predict", "--model", str(out), *files, "--out", str(tmp_path / "preds.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "preds.csv")))
    assert len(rows) == len(files)
    assert rows[-1]["error"].startswith("not_dicom") and rows[-1]["prediction"] == ""
    good = rows[:-1]
    assert all(r["error"] == "" and r["prediction"] in ("normal", "finding") for r in good)
    p_abn = np.array([float(r["p_finding"]) for r in good])
    np.testing.assert_allclose(p_abn + np.array([float(r["p_normal"]) for r in good]), 1.0, rtol=1e-6)
    y = (val.label == "finding").to_numpy()
    scores = np.load(out / "val_scores.npz")
    np.testing.assert_allclose(np.sort(p_abn), np.sort(1 - scores["probs"][:, 0]), atol=1e-4)
    m = json.loads((out / "metrics.json").read_text())
    assert auroc(y, p_abn) == pytest.approx(m["val_auc_abnormal"], abs=1e-6)


def test_multi_device_worker_on_logical_cpus(ray_cluster, prepared_binary, tmp_path):
    from xray_dist.training.driver import train

    _, cache = prepared_binary
    res = train(cfg_for(cache, tmp_path / "run", epochs=1, cpu_replicas=2, batch_size=4, head_width=8,
                        unfreeze_blocks=1))  # dropout too; all blocks trainable on 2 replicas: tests/test_shape.py
    final = res.metrics["final"]
    assert final["replicas"] == 2 and final["world_size"] == 1 and final["global_batch"] == 8


def kill_this_runs_worker(checkpoints, worker) -> tuple[threading.Thread, list[dict]]:
    """A thread that SIGKILLs the rank-0 worker of *this* run — the pid the run recorded in
    ``RUN/workers/rank0.json`` (``worker()`` reads it, or None) — once ``checkpoints()`` (the
    number saved, or being saved) reaches two — so the first is surely registered with Ray Train,
    not still being uploaded — and the worker is still training; returns it (started) and the list
    it appends the killed worker's record to, with the checkpoint count at the kill."""
    killed: list[dict] = []

    def killer():
        deadline = time.time() + 400
        while time.time() < deadline and not killed:
            info = worker()
            n = checkpoints()
            if info and n >= 2:
                try:
                    os.kill(info["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    return  # the run ended first: the test fails on `killed`
                killed.append({**info, "checkpoints_at_kill": n})
            time.sleep(0.3)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    return t, killed


def assert_restarted(killed: list[dict], after: dict, epochs: int) -> None:
    """The killed worker was this run's, killed before the last epoch's checkpoint, and a new
    process resumed from a checkpoint before the last epoch."""
    assert killed, "no worker was killed"
    assert killed[0]["checkpoints_at_kill"] < epochs, "killed after the run had checkpointed every epoch"
    assert after["pid"] != killed[0]["pid"], "no new worker process"
    assert 1 <= after["resumed_after_epoch"] < epochs, after


# The resume tests' run: a hidden layer (dropout draws random numbers), light augmentation (each
# image's draw is a function of seed, epoch and image: tests/test_augment.py), 4 epochs.
RESUMED = dict(epochs=4, head_width=8, dropout=0.5, augment="light")


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, prepared_binary, tmp_path_factory):
    """The run the resume tests' runs would have been without their interruption."""
    from xray_dist.training.driver import train

    out = tmp_path_factory.mktemp("uninterrupted")
    train(cfg_for(prepared_binary[1], out, **RESUMED))
    return out


def run_state(run, read_h5) -> tuple:
    """(exported weights, history rows) of a run directory."""
    return read_h5(Path(run) / "model" / "weights.h5"), read_history(run)


def test_worker_killed_mid_run_resumes_exactly_and_counts_each_epoch_once(prepared_binary, uninterrupted, tmp_path,
                                                                          same_run, read_h5):
    from xray_dist.training.driver import train

    _, cache = prepared_binary
    out = tmp_path / "run"

    def worker():
        try:
            return json.loads((out / "workers" / "rank0.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    t, killed = kill_this_runs_worker(lambda: len(list((out / "ray" / "train").glob("checkpoint_*"))), worker)
    res = train(cfg_for(cache, out, **RESUMED))
    t.join(timeout=5)
    assert_restarted(killed, worker(), RESUMED["epochs"])
    assert [int(h["epoch"]) for h in read_history(out)] == [1, 2, 3, 4]
    assert res.metrics["epochs"] == 4 and res.metrics["complete"]
    # the restarted worker went on from the checkpoint with Adam's moments, the dropout generator
    # and the data order of the uninterrupted run: the same numbers every epoch, the same model
    same_run(run_state(uninterrupted, read_h5), run_state(out, read_h5))
    assert res.metrics["best_epoch"] == json.loads((uninterrupted / "metrics.json").read_text())["best_epoch"]


def test_rerun_same_out_resumes_exactly(prepared_binary, uninterrupted, tmp_path, same_run, read_h5):
    from xray_dist.errors import XrayDistError
    from xray_dist.training.driver import train

    _, cache = prepared_binary
    out = tmp_path / "run"
    train(cfg_for(cache, out, **{**RESUMED, "epochs": 2}))  # as if stopped after epoch 2
    first = read_history(out)
    train(cfg_for(cache, out, **RESUMED))
    second = read_history(out)
    assert [int(h["epoch"]) for h in second] == [1, 2, 3, 4]
    assert [h["epoch_seconds"] for h in second[:2]] == [h["epoch_seconds"] for h in first]  # not retrained
    same_run(run_state(uninterrupted, read_h5), run_state(out, read_h5))
    # --precision auto: on a CPU with bfloat16 instructions (CI's has AMX) both runs computed in
    # bfloat16, so this is the exact resume of a bfloat16 run; it says so, and stores float32 weights
    from xray_dist.model.precision import cpu_bf16_flag

    flag = cpu_bf16_flag()
    m = json.loads((out / "metrics.json").read_text())
    assert m["precision"] == {"compute": "bfloat16" if flag else "float32", "weights": "float32",
                              "why": f"auto: this CPU has {flag}" if flag else m["precision"]["why"]}, m["precision"]
    assert json.loads((out / "workers" / "rank0.json").read_text())["precision"] == m["precision"]["compute"]
    assert {a.dtype.name for a in read_h5(out / "model" / "weights.h5").values()} == {"float32"}
    assert m["config"]["augment"] == "light"  # the augmented run resumed exactly
    with pytest.raises(XrayDistError, match="head_width") as e:
        train(cfg_for(cache, out, **{**RESUMED, "head_width": 16, "augment": "none"}))
    assert "augment" in str(e.value)  # every changed setting named: resuming without augmentation too


def rank0_log(ray_cluster, worker_node_temp_dir, run: Path) -> str:
    """What the run's rank-0 worker process wrote, read from Ray's log files on whichever node it ran
    (``workers/rank0.json`` names its pid). The run's own log file gets these lines only as Ray
    forwards them to the driver, which this test cluster's second node does not do."""
    pid = json.loads((run / "workers" / "rank0.json").read_text())["pid"]
    roots = (Path(ray_cluster.head_node.get_session_dir_path()) / "logs", worker_node_temp_dir)
    files = sorted(f for root in roots for f in root.rglob(f"worker-*-{pid}.*"))
    assert files, f"no Ray log file of pid {pid}"
    return "".join(f.read_text(errors="replace") for f in files)


def test_a_streamed_split_trains_and_resumes(ray_cluster, worker_node_temp_dir, prepared_binary, tmp_path):
    """``--worker-cache-mb 0``: the training split does not fit in the worker's memory, so it streams
    Ray Data's share every epoch. The command trains 1 epoch, then resumes to 2 (epoch 1 not
    trained again), and the worker's log says which input order each run used and how it resumed."""
    from xray_dist.cli.app import main

    _, cache = prepared_binary
    out = tmp_path / "streamed"
    argv = ["train", "--cache", str(cache), "--out", str(out), "--batch-size", "8", "--lr", "1e-4", "--weights", "none",
            "--unfreeze-blocks", "1", "--num-workers", "1", "--cpus-per-worker", "0.5", "--worker-cache-mb", "0"]
    streamed = "input: Ray Data shard order (streamed: the training split is larger than worker_cache_mb"
    assert main([*argv, "--epochs", "1"]) == 0
    first = read_history(out)
    assert [int(h["epoch"]) for h in first] == [1]
    text = rank0_log(ray_cluster, worker_node_temp_dir, out)
    assert text.count(streamed) == 1 and "global-batch order" not in text, text[-3000:]
    assert main([*argv, "--epochs", "2"]) == 0
    second = read_history(out)
    assert [int(h["epoch"]) for h in second] == [1, 2]
    assert second[0]["epoch_seconds"] == first[0]["epoch_seconds"]  # not retrained
    text = rank0_log(ray_cluster, worker_node_temp_dir, out)  # the resumed run's worker (a new process)
    assert text.count(streamed) == 1 and "global-batch order" not in text, text[-3000:]
    assert ("resuming from the checkpoint after epoch 1 (optimizer and dropout state restored; the data order is "
            "Ray Data's (the training split is larger than worker_cache_mb)") in text
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs"] == 2 and m["complete"] and m["config"]["worker_cache_mb"] == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit(synth_binary, tmp_path):
    """`ray job submit` of the jobs that use Ray — jobs/prepare.py (Ray Data) and jobs/tune.py (Tune,
    its trial a Ray Train run, as jobs/train.py's is) — to a `ray start --head` this test starts and
    stops. The sweep's trial is a Ray Train run (``--trial-runner train``: the path that multi-worker
    trials take), so Train V2 under Tune with ``TuneReportCallback`` is covered here. evaluate and
    report use no Ray: as jobs they are their commands (tests/test_cli.py runs each jobs/ script), run
    against a sweep in the object-storage test."""
    import secrets
    import shutil
    import tempfile

    bindir = Path(sys.executable).parent
    gcs, dash = _free_port(), _free_port()
    short = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # Ray's socket paths must stay short
    token = short / "token"
    token.write_text(secrets.token_hex(32))
    # Ray 2.60 clusters use token authentication; the head, the CLI and the job share this token.
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token))
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(bindir / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={short}",
         "--object-store-memory=400000000",
         # the session's own cluster already holds Ray's default agent ports on this machine
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while time.time() < deadline:
            ok = subprocess.run([str(bindir / "ray"), "job", "list", "--address", address], env=env,
                                capture_output=True).returncode == 0
            if ok:
                break
            time.sleep(2)
        else:
            pytest.fail("the Ray head's dashboard never came up")
        def submit(*job):
            cmd = [str(bindir / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                   sys.executable, *job]
            for _ in range(20):  # the head's job agent starts a little after the dashboard answers
                sub = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
                said = sub.stderr + sub.stdout
                # a dashboard briefly not answering (seen once on a starved 2-core machine) is retried too
                if "No available agent to submit job" not in said and "Connection refused" not in said:
                    break
                time.sleep(3)
            assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
            return sub.stdout

        cache = tmp_path / "jobcache"
        stdout = submit("jobs/prepare.py", str(synth_binary.out), "--labels", str(synth_binary.labels_csv), "--out",
                        str(cache), "--image-size", "32", "--seed", "3", "--test-fraction", "0.2")
        assert "prepare: 80 of 80 files used" in stdout
        # jobs/train.py's Ray Train run inside a job is what each trial below is (--trial-runner
        # train); the script itself is the same CLI entry (tests/test_cli.py runs each jobs/ script)
        sweep_out = tmp_path / "jobsweep"
        stdout = submit("jobs/tune.py", "--cache", str(cache), "--out", str(sweep_out), "--epochs", "1",
                        "--weights", "none", "--head-widths", "8", "--num-classes", "2", "--unfreeze-blocks", "0",
                        "--lr", "1e-3", "--scheduler", "fifo", "--batch-size", "8", "--trial-runner", "train")
        with open(sweep_out / "results.csv") as f:
            rows = list(csv.DictReader(f))
        assert [(int(r["head_width"]), r["status"], r["epochs"]) for r in rows] == [(8, "completed", "1")], rows
        # the trial a Ray Train run: its worker recorded itself, its report reached Tune
        assert (Path(rows[0]["model"]) / "workers" / "rank0.json").is_file()
        assert (Path(rows[0]["model"]) / "ray").is_dir() and not (Path(rows[0]["model"]) / "checkpoints").exists()
        assert json.loads((sweep_out / "best.json").read_text())["model"] == rows[0]["model"]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        if not os.environ.get("KEEP_RAY_LOGS"):  # keep the head's logs to debug a failure
            shutil.rmtree(short, ignore_errors=True)


class TestShardCache:
    @staticmethod
    def shard(n=40, reverse=False):
        import ray

        items = [{"path": f"p{i:03d}.dcm", "x": np.full((4, 4), i, np.uint8), "label": i % 2, "weight": 1.0}
                 for i in range(n)]
        return ray.data.from_items(items[::-1] if reverse else items).iterator()

    @staticmethod
    def ids(passes) -> list[list[int]]:
        return [[int(v) for x, _, _ in p for v in x[:, 0, 0]] for p in passes]

    def test_later_epochs_come_from_memory_reshuffled(self, ray_cluster):
        from xray_dist.training.pipeline import BatchOrder, ShardCache

        order = BatchOrder(batch_size=8, per_pass=4, shuffle_buffer=0, seed=1, limit_bytes=1 << 20)
        c = ShardCache(self.shard(), order)
        first = [b for b in c.batches()]
        assert len(first) == 4 and all(len(x) == 8 for x, _, _ in first)
        assert c.rows is not None and len(c.rows[0]) == 40  # the whole pass is kept, the drained rest too

        class Gone:
            def iter_batches(self, **_):
                raise AssertionError("Ray Data was read again")

        c.shard = Gone()
        second, third = list(c.batches()), list(c.batches())
        ids = self.ids([second, third])
        assert len(second) == len(third) == 4 and len(set(ids[0])) == 32  # no row twice in a pass
        assert ids[0] != ids[1]
        for x, y, _ in second:  # labels travel with their images
            np.testing.assert_array_equal(y, x[:, 0, 0] % 2)

    def test_rows_of_the_partial_batch_are_kept_for_later_epochs(self, ray_cluster):
        from xray_dist.training.pipeline import BatchOrder, ShardCache

        order = BatchOrder(batch_size=8, per_pass=5, shuffle_buffer=0, seed=3, limit_bytes=1 << 20)
        c = ShardCache(self.shard(44), order)
        first = list(c.batches())
        assert len(first) == 5 and all(len(x) == 8 for x, _, _ in first)  # 4 rows wait in the partial batch
        assert len(c.rows[0]) == 44
        seen = {int(v) for x, _, _ in first for v in x[:, 0, 0]}
        for _ in range(8):
            seen |= {int(v) for x, _, _ in c.batches() for v in x[:, 0, 0]}
        assert seen == set(range(44))  # every row trains in some epoch

    def test_too_big_streams_every_epoch(self, ray_cluster):
        from xray_dist.training.pipeline import BatchOrder, ShardCache

        c = ShardCache(self.shard(), BatchOrder(batch_size=8, per_pass=4, shuffle_buffer=0, seed=1, limit_bytes=100))
        assert len(list(c.batches())) == 4 and c.rows is None
        assert len(list(c.batches())) == 4  # read from Ray Data again

    def test_whole_split_order_is_a_function_of_seed_and_epoch(self, ray_cluster):
        """Every worker holds the whole split: each epoch's batches depend on (seed, epoch), not on
        the order the rows arrived in; the ranks take disjoint equal parts of one permutation; a
        cache resumed after epoch 2 gives the uninterrupted run's epochs 3 and 4."""
        from xray_dist.training.pipeline import BatchOrder, ShardCache

        def run(rank, reverse=False, start=0, passes=4):
            c = ShardCache(self.shard(42, reverse), BatchOrder(batch_size=4, per_pass=5, shuffle_buffer=8, seed=7,
                                                               limit_bytes=0, whole=True, rank=rank, world=2),
                           start_epoch=start)
            return self.ids([list(c.batches()) for _ in range(passes)])

        r0, r1 = run(0), run(1)
        assert run(0, reverse=True) == r0  # delivered in another order: the same batches
        assert run(0, start=2, passes=2) == r0[2:]  # resumed after epoch 2
        for e in range(4):
            assert len(r0[e]) == len(r1[e]) == 20 and not set(r0[e]) & set(r1[e])  # equal, disjoint parts
        assert len({tuple(p) for p in r0}) == 4  # a new order every epoch
        assert set().union(*r0, *r1) == set(range(42))  # over the epochs every row trains
        c = ShardCache(self.shard(42), BatchOrder(batch_size=4, per_pass=5, shuffle_buffer=8, seed=8, limit_bytes=0,
                                                  whole=True, rank=0, world=2))
        assert self.ids([list(c.batches())]) != r0[:1]  # another seed, another order


def test_equal_steps_on_every_worker_from_uneven_shards(ray_cluster):
    """41 rows for 3 workers: StepPlan gives every worker the same number of full batches, and every
    worker's input yields exactly that many per epoch — whole split or Ray Data's streamed shares
    (read at once, as the workers do) — so MultiWorkerMirroredStrategy never waits on a worker
    that ran out."""
    import ray

    from xray_dist.training.pipeline import BatchOrder, ShardCache, StepPlan

    items = [{"path": f"p{i:03d}", "x": np.full((2, 2), i, np.uint8), "label": i % 2, "weight": 1.0}
             for i in range(41)]
    plan = StepPlan.make(41, world=3, replicas=3, batch_size=4)
    assert plan.steps == 41 // 3 // 4 == 3 and plan.local_replicas == 1
    whole = {}
    for r in range(3):
        order = BatchOrder(4, plan.steps, 0, 1, 0, whole=True, rank=r, world=3)
        c = ShardCache(ray.data.from_items(items).iterator(), order)
        whole[r] = [[len(b[0]) for b in c.batches()] for _ in range(2)]
    shards = ray.data.from_items(items, override_num_blocks=5).streaming_split(3, equal=True)
    counts: dict[int, list[int]] = {}

    def consume(r):
        c = ShardCache(shards[r], BatchOrder(4, plan.steps, 0, 1, limit_bytes=0))  # streamed every epoch
        counts[r] = [sum(1 for _ in c.batches()) for _ in range(2)]

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert counts == {r: [plan.steps, plan.steps] for r in range(3)}
    assert whole == {r: [[4] * plan.steps] * 2 for r in range(3)}


def test_ray_engine_predicts_what_the_local_engine_does(two_worker_run, synth_binary, tmp_path, caplog):
    """predict --engine ray (Ray Data: decode tasks, model actors) writes the local engine's CSV:
    same rows in the same order, same probabilities, same errors; decoding is not fused into the actors."""
    import logging

    from xray_dist.inference.predict import predict_files

    _, _, run = two_worker_run
    files = [str(synth_binary.out / rel) for rel in sorted(synth_binary.labels)[:12]]
    (tmp_path / "bad.dcm").write_bytes(b"not a dicom file")
    files.insert(5, str(tmp_path / "bad.dcm"))
    local = predict_files(run, files, tmp_path / "local.csv", engine="local")
    with caplog.at_level(logging.DEBUG, logger="xray_dist.inference.predict"):
        distributed = predict_files(run, files, tmp_path / "ray.csv", engine="ray")
    names = [Path(f).name for f in files]  # absolute paths given: outputs name the files, not the directories
    assert [r["path"] for r in distributed] == [r["path"] for r in local] == names
    assert [r["error"] for r in distributed] == [r["error"] for r in local]
    assert sum(bool(r["error"]) for r in local) == 1
    for a, b in zip(local, distributed):
        if not a["error"]:
            assert a["prediction"] == b["prediction"]
            assert b["p_finding"] == pytest.approx(a["p_finding"], abs=1e-5)
    plan = "\n".join(r.getMessage() for r in caplog.records if "Ray Data plan" in r.getMessage())
    assert "MapBatches(_decode_rows)" in plan and "MapBatches(_Scorer)" in plan
    assert "MapBatches(_decode_rows)->MapBatches(_Scorer)" not in plan  # decode tasks apart from the actors


def test_a_failed_export_leaves_the_previous_outputs_whole(ray_cluster, prepared_binary, tmp_path, monkeypatch):
    """The disk fills up half-way through exporting a resumed run (after the new weights, metrics
    and history are written, at the ROC plot): the run directory still holds the previous export,
    complete and loadable, and nothing of the half-written one."""
    from xray_dist.results import plots
    from xray_dist.model.artifacts import load_run_model
    from xray_dist.training.driver import train

    _, cache = prepared_binary
    out = tmp_path / "run"
    # in-process: the driver exports either runner's result the same way (the subject here), without
    # a Ray Train controller and worker to start twice
    train(cfg_for(cache, out, epochs=1, unfreeze_blocks=0, runner="inprocess"))
    exported = ["metrics.json", "history.csv", "val_scores.npz", "roc.png", "training_curves.png"]
    exported += [f"model/{p.name}" for p in (out / "model").iterdir()]
    before = {name: (out / name).read_bytes() for name in exported}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "plot_roc", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train(cfg_for(cache, out, epochs=2, unfreeze_blocks=0, runner="inprocess"))
    assert {name: (out / name).read_bytes() for name in exported} == before
    assert sorted(p.name for p in (out / "model").iterdir()) == sorted(n[6:] for n in exported if n.startswith("model/"))
    assert not [p for p in out.iterdir() if p.name.startswith(".writing")]
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 1
    load_run_model(out)  # loadable


def test_real_jpeg2000_radiographs_through_prepare_and_predict(two_worker_run, tmp_path):
    """pydicom-data's RG JPEG 2000 radiographs (lossless and lossy, ~1900 px, windowed): prepare
    takes the reduced-resolution decode, its cached inputs equal what predict's reader gives, and
    predict scores the files exactly as the model scores the cached inputs."""
    import pydicom
    import pyarrow.compute as pc
    from pydicom.data import get_testdata_file

    from xray_dist.config import PrepareConfig
    from xray_dist.data.prepare import prepare
    from xray_dist.data.cache import tensor_column_to_numpy as _tensor_column_to_numpy, images_dataset, load_spec
    from xray_dist.data.dicom import load_image, read_dataset
    from xray_dist.data.j2k import decode_reduced
    from xray_dist.inference.predict import predict_files
    from xray_dist.model.artifacts import load_run_model, predict_arrays

    _, train_cache, run = two_worker_run
    data = tmp_path / "rg"
    data.mkdir()
    names = ["RG1_J2KR.dcm", "RG1_J2KI.dcm", "RG3_J2KR.dcm", "RG3_J2KI.dcm"]
    for n in names:
        shutil.copy(get_testdata_file(n), data / n)
    (data / "labels.csv").write_text("path,label\n" + "".join(f"{n},{'normal' if 'RG1' in n else 'finding'}\n"
                                                            for n in names))
    spec = load_spec(train_cache)  # the run's preprocessing: 32 px, reduced JPEG 2000 decode
    assert spec.j2k_reduce
    cache = tmp_path / "cache"
    report = prepare(PrepareConfig(data_dir=str(data), labels=str(data / "labels.csv"), out=str(cache),
                                   preprocess=spec, val_fraction=0.0))
    assert report["ok"] == 4 and not report["quarantined"]
    for n in names:  # the fast path is really the one taken
        assert decode_reduced(read_dataset(data / n), spec.image_size) is not None
    table = images_dataset(cache).to_table(columns=["path", "image"], filter=pc.field("error") == "")
    cached = dict(zip(table.column("path").to_pylist(),
                      _tensor_column_to_numpy(table.column("image").combine_chunks(), spec.image_size)))
    lm = load_run_model(run)
    for n in names:
        np.testing.assert_array_equal(cached[n], load_image(data / n, lm.preprocess))
    assert pydicom.dcmread(data / names[0], stop_before_pixels=True).Rows > 8 * spec.image_size
    rows = predict_files(run, [str(data)], tmp_path / "p.csv", engine="local", precision="float32")  # as lm
    expected = predict_arrays(lm, np.stack([cached[r["path"]] for r in rows]))
    np.testing.assert_allclose([[float(r["p_normal"]), float(r["p_finding"])] for r in rows], expected, atol=1e-6)


def test_a_nan_metric_is_written_to_metrics_json_as_null(tmp_path):
    """metrics.json is standard JSON: a metric that is NaN (an AUC with a class absent from
    validation) or infinite is written as null, never as the bare ``NaN`` token that strict readers
    (browsers, jq) refuse — the old ``json.dumps(default=...)`` hook never saw floats."""
    from xray_dist.training.export import write_metrics

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    metrics = {"val_auc": float("nan"), "best": {"val_auc_pneumonia": np.float64("nan"), "loss": 0.5},
               "final": {"specificity": float("inf")}, "epochs": np.int64(3), "classes": ["normal", "pneumonia"]}
    with pytest.raises(ValueError, match="NaN"):  # what the plain json module writes for the same metrics
        json.loads(json.dumps(metrics, default=str), parse_constant=refuse)
    write_metrics(tmp_path, metrics)
    assert json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse) == {
        "val_auc": None, "best": {"val_auc_pneumonia": None, "loss": 0.5}, "final": {"specificity": None},
        "epochs": 3, "classes": ["normal", "pneumonia"]}


def test_train_workers_get_the_jobs_own_environment(prepared_binary, tmp_path, monkeypatch):
    """Ray Train's workers get exactly the variables the commands give the job (``worker_env``),
    object-store endpoint included: any other set is a second pool of worker processes, and each
    Ray Data task of the run then started a new process."""
    import ray

    from xray_dist.infra.runtime import WORKER_ENV, init_ray, worker_env
    from xray_dist.training.driver import make_trainer

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # as with -v
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-workers")
    env = worker_env()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9" and "AWS_SECRET_ACCESS_KEY" not in env
    assert all(env[k] == v for k, v in WORKER_ENV.items() if k != "TF_CPP_MIN_LOG_LEVEL")  # that one: -v's
    trainer, _, _ = make_trainer(cfg_for(prepared_binary[1], tmp_path / "run", epochs=1))
    assert trainer.run_config.worker_runtime_env == {"env_vars": env}
    seen = {}  # what a command's own ray.init gives the job
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **kw: seen.update(kw))
    init_ray("127.0.0.1:9")
    job = seen["runtime_env"]["env_vars"]
    assert {k: job[k] for k in env} == env  # Ray merges the two sets: one set, one pool
