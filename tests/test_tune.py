"""Sweeps on real Ray Tune driving Ray Train V2: all three dimensions, early stopping, a failed
trial recorded while the others finish, an interrupted sweep resumed, shared frozen features."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xray_dist.config import PrepareConfig, PreprocessSpec, SweepConfig, TrainConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache3(ray_cluster, tmp_path_factory):
    """Three labels (normal + two findings), 32 px."""
    from xray_dist.data.prepare import prepare
    from xray_dist.data.synth import synthesize

    data = tmp_path_factory.mktemp("synth3")
    syn = synthesize(data, patients=36, images_per_patient=2, classes=("normal", "nodule", "effusion"), size=64,
                     seed=5)
    good = syn.files[0].read_bytes()
    (data / "images" / "zz_truncated.dcm").write_bytes(good[: len(good) // 2])  # quarantined: no trial may see it
    with syn.labels_csv.open("a") as f:
        f.write("images/zz_truncated.dcm,normal\n")
    cache = tmp_path_factory.mktemp("cache3")
    report = prepare(PrepareConfig(data_dir=str(data), labels=str(syn.labels_csv), out=str(cache),
                                   preprocess=PreprocessSpec(image_size=32), seed=2, test_fraction=0.2))
    (quarantined,) = report["quarantined"]
    assert quarantined["path"] == "images/zz_truncated.dcm" and quarantined["reason"].startswith("truncated: "), \
        quarantined  # reported as cut off, not as a codec's failure
    return cache


def base(cache, out, **kw) -> TrainConfig:
    d = dict(cache=str(cache), out=str(out), epochs=2, batch_size=8, lr=1e-3, weights="none", num_workers=1,
             cpus_per_worker=0.5)
    d.update(kw)
    return TrainConfig(**d)


def read_results(out) -> list[dict]:
    with open(Path(out) / "results.csv") as f:
        return list(csv.DictReader(f))


def test_sweep_over_all_three_dimensions_with_a_failing_trial(cache3, tmp_path, monkeypatch, chromium, wider_than):
    from xray_dist.training.tune import sweep

    out = tmp_path / "sweep"
    # the cache given relative to the driver's working directory, as users type it: trials run in
    # their own directories, so the sweep must resolve it first
    monkeypatch.chdir(cache3.parent)
    # four combinations that vary head width, class scheme and unfreeze depth, plus K = 5, which needs
    # five labels: the cache has three, so that trial raises while the others finish.
    combos = ((0, 2, 0), (8, 3, 0), (0, 3, 1), (8, 2, 1), (0, 5, 0))
    # max_failures=0: the K = 5 trial fails the same way every time (retries would only cost time)
    # FIFO: every trial that does not fail completes, so the checks on non-best trials below always
    # have trials to check (ASHA's stopping has its own deterministic test)
    cfg = SweepConfig(base=base(cache3.name, out, max_failures=0), out=str(out), combos=combos, lr=(1e-3, 3e-3),
                      scheduler="fifo", max_concurrent=2)
    summary = sweep(cfg)
    rows = read_results(out)
    assert len(rows) == 5
    assert {(int(r["head_width"]), int(r["num_classes"]), int(r["unfreeze_blocks"])) for r in rows} == set(combos)
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["num_classes"] == "5" and "num_classes=5" in failed[0]["error"]
    assert summary["failed"] == 1
    ok = [r for r in rows if r["status"] != "failed"]
    assert all(1e-3 <= float(r["lr"]) <= 3e-3 for r in ok)
    assert all(r["status"] in ("completed", "stopped_early") for r in ok)
    assert any(r["status"] == "completed" for r in ok)
    assert all(r["shared_features"] == "True" for r in ok)  # depths 0 and 1 both freeze something
    from xray_dist.data.cache import FEATURES_DIR
    from xray_dist.training.features import read_meta

    depths = {read_meta(d)["unfreeze_blocks"] for d in (cache3 / FEATURES_DIR).iterdir() if (d / "meta.json").is_file()}
    assert 2 not in depths  # the default unfreeze_blocks include 2, but no combo trains at depth 2
    best = json.loads((out / "best.json").read_text())
    assert {"config", "metrics", "model"} <= set(best) and "val_auc_abnormal" in best["metrics"]
    completed = [r for r in ok if r["status"] == "completed"]
    assert max(float(r["val_auc_abnormal"]) for r in completed) == pytest.approx(best["metrics"]["val_auc_abnormal"])
    assert (out / "sweep.png").is_file()
    from xray_dist.model.artifacts import load_run_model

    lm = load_run_model(best["model"])  # the best model is a full model that predict accepts
    assert lm.scheme.num_classes == best["config"]["num_classes"]
    assert (Path(best["model"]) / "model" / "weights.h5").is_file()
    # the other trials exported their trained top only (no 58 MB VGG16 per trial at 224 px): loading
    # one rebuilds the full model on its frozen base, which scores images as the trial scored features
    from xray_dist.data.cache import load_split_arrays
    from xray_dist.model.artifacts import predict_arrays

    _, val_images = load_split_arrays(cache3, "val")
    others = [r for r in completed if r["model"] != best["model"]]
    assert len(completed) == 4 and len(others) == 3
    for r in others:
        model_dir = Path(r["model"]) / "model"
        assert not (model_dir / "weights.h5").exists() and (model_dir / "top_weights.h5").is_file()
        stored = np.load(Path(r["model"]) / "val_scores.npz")["probs"]
        rebuilt = predict_arrays(load_run_model(r["model"], "auto"), val_images)  # as its features were computed
        np.testing.assert_allclose(np.sort(rebuilt[:, 0]), np.sort(stored[:, 0]), atol=1e-4)
    params = {int(r["unfreeze_blocks"]): int(r["trainable_parameters"]) for r in ok if r["trainable_parameters"]}
    assert params[1] > params[0]
    # the sweep's HTML report: every trial in the table, the best trial's run below it
    from xray_dist.results.report import write_report

    # the best trial evaluated once on the held-out test patients: best.json shows it beside its
    # (biased, best-of-N) validation score, and the report puts it first
    from xray_dist.results.evaluate import evaluate_model

    assert "biased upward" in best["validation_bias"]
    ev = evaluate_model(str(out), str(cache3), n_boot=100)
    assert ev["model"] == best["model"] and ev["sweep"] == str(out) and (out / "evaluation" / "test").is_dir()
    assert json.loads((out / "best.json").read_text())["test"]["auc_abnormal"] == ev["auc_abnormal"]
    # `calibrate SWEEP` calibrates the best trial (a softmax over 3 classes is refused, its one-vs-rest
    # rankings would move), and leaves every other trial as it was
    from xray_dist.cli import app as cli

    spec_of = {r["model"]: json.loads((Path(r["model"]) / "model" / "model_spec.json").read_text()) for r in completed}
    code = cli.main(["calibrate", "--model", str(out)])
    calibrated = json.loads((Path(best["model"]) / "model" / "model_spec.json").read_text())
    classes = spec_of[best["model"]]["classes"]
    if len(classes["names"]) > 2 and not classes["multilabel"]:
        assert code == 2 and "calibration" not in calibrated
    else:
        assert code == 0 and calibrated["calibration"]["fitted_on"] == "validation"
    for r in others:
        assert json.loads((Path(r["model"]) / "model" / "model_spec.json").read_text()) == spec_of[r["model"]]
    page = write_report(out, tmp_path / "sweep.html", n_boot=200)
    text = page.read_text()
    assert text.index("Held-out test") < text.index("Sweep ") and "biased upward; held-out test AUROC" in text
    import re

    table = re.search(r'<table class="results">(.*?)</table>', text, re.S).group(1)
    assert table.count("<tr><td>") == 5  # every trial, the failed one included
    assert "failed" in text and "Best trial" in text and Path(best["model"]).name in text
    assert chromium(page, tmp_path / "sweep.png") == "5/5"  # sweep plot + the best run's four pictures
    assert wider_than(page, 1280) == []  # the table (and everything else) fits a 1280 px page
    # trials are named by their settings, in results.csv, on disk and in the report
    for r in rows:
        name = f"W{r['head_width']}-K{r['num_classes']}-D{r['unfreeze_blocks']}-lr"
        assert r["trial"].startswith(name) and re.fullmatch(r".*-lr\d(\.\d+)?e-\d_\d{5}", r["trial"]), r["trial"]
        assert (out / "trials" / r["trial"]).is_dir() and f"<td>{r['trial']}</td>" in table


def zero_features(cache: Path, weights: str, seed: int, depth: int) -> int:
    """Give ``cache`` frozen features for ``depth`` that are all zero (the sweep's shared-feature
    directory for that depth, extracted once and then overwritten in place, same rows and tensor
    type): every trial at that depth trains and is scored on inputs that carry nothing. Returns
    the number of rows."""
    import pyarrow.parquet as pq
    from ray.data.block import BlockAccessor

    from xray_dist.infra import storage
    from xray_dist.training.features import ensure_features

    feats = Path(ensure_features(cache, weights, seed, depth, where="here"))
    rows = 0
    for shard in sorted((feats / "shards").glob("*.parquet")):
        batch = BlockAccessor.for_block(pq.read_table(shard)).to_batch_format("numpy")
        assert batch["x"].any()  # the real activations, before they are wiped
        rows += len(batch["path"])
        storage.write_parquet(BlockAccessor.batch_to_block({"path": batch["path"], "x": np.zeros_like(batch["x"])}),
                              str(shard))
    return rows


def test_asha_stops_the_trial_built_to_be_weak(prepared_binary, tmp_path):
    """A deterministic sweep (one trial at a time): the first trial is sound (all blocks trainable;
    it separates the binary set's validation patients from its first epoch); the second is weak by
    construction, whatever its initialisation: it trains its head at unfreeze depth 0 on the
    sweep's shared frozen features, and those are all zero here (a frozen base that sees nothing).
    Every validation image then gets the same score, so its AUROC is exactly 0.5 at every epoch,
    below the sound trial's at the first rung, and ASHA stops it there. (It used to be a one-unit
    ReLU head "that never fires": whether it fires depends on its random initial weights; before
    that, "dropout 0.9", which tied the sound trial in CI.)"""
    import shutil

    from xray_dist.data.cache import load_manifest
    from xray_dist.training.tune import sweep

    _, prepared = prepared_binary
    cache = tmp_path / "cache"  # a copy: the session's cache keeps its real features
    shutil.copytree(prepared, cache, ignore=shutil.ignore_patterns("features"))
    out = tmp_path / "asha"
    cfg = SweepConfig(base=base(cache, out, epochs=4, lr=1e-4), out=str(out), combos=((0, 2, 5), (8, 2, 0)),
                      lr=(1e-4, 1e-4), scheduler="asha", grace_period=1, max_concurrent=1)
    assert zero_features(cache, cfg.base.weights, cfg.base.seed, 0) == load_manifest(cache).num_rows
    sweep(cfg)
    rows = {int(r["unfreeze_blocks"]): r for r in read_results(out)}
    sound, weak = rows[5], rows[0]
    assert sound["status"] == "completed" and sound["epochs"] == "4", sound
    assert float(sound["val_auc_abnormal"]) > 0.5, sound  # it separates something at the first rung already
    assert weak["shared_features"] == "True", weak  # it trained on the zeroed features
    assert float(weak["val_auc_abnormal"]) == 0.5, weak  # one score for every image: chance, exactly
    # stopped by the scheduler at the first rung (grace period 1): one epoch reported, one
    # checkpoint written, no export — not a failure, not a run that ended on its own
    assert weak["status"] == "stopped_early" and weak["epochs"] == str(cfg.grace_period) and not weak["error"], weak
    trial = out / "trials" / weak["trial"]
    assert not (trial / "metrics.json").exists()
    assert sorted(p.name for p in (trial / "checkpoints").iterdir()) == ["epoch_0001"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_interrupted_sweep_resumes(ray_cluster, cache3, tmp_path, where, s3_server):
    """The sweep's driver killed after one trial finished; the same command resumes from the
    sweep's directory (on local disk, or in a bucket: Tune's state, trials and checkpoints there).
    On local disk, then resumed from a search state that lags Tune's trials."""
    from xray_dist.infra import storage
    from xray_dist.training.tune import sweep

    out = str(tmp_path / "sweep") if where == "local" else f"{s3_server.bucket('resume-sweep')}/sweep"
    args = [sys.executable, "-m", "xray_dist.cli", "tune", "--cache", str(cache3), "--out", out,
            "--epochs", "1", "--weights", "none", "--head-widths", "0,8", "--num-classes", "2",
            "--unfreeze-blocks", "0", "--lr", "1e-3,1e-3", "--scheduler", "fifo", "--max-concurrent", "1",
            "--batch-size", "8", "--cpus-per-worker", "0.5", "--address", ray_cluster.address]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    done = []
    trials = storage.join(out, "trials")
    while time.time() < deadline and proc.poll() is None:
        # a trial's own metrics.json, not the one still in its export's staging directory (.writing_*)
        done = [storage.join(trials, e.rel) for e in storage.list_files(trials) if e.rel.endswith("/metrics.json")
                and not any(part.startswith(".") for part in e.rel.split("/"))]
        if done:
            break
        time.sleep(1)
    assert done, "the first trial never finished"
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep's driver dies mid-sweep
    proc.wait()
    history = storage.join(storage.parent(done[0]), "history.csv")
    first_history = storage.read_text(history)
    first_mtime = storage.info(done[0]).mtime_ns
    cfg = SweepConfig(base=base(cache3, out, epochs=1), out=out, head_widths=(0, 8), num_classes=(2,),
                      unfreeze_blocks=(0,), lr=(1e-3, 1e-3), scheduler="fifo", max_concurrent=1)
    summary = sweep(cfg)
    rows = list(csv.DictReader(storage.read_text(storage.join(out, "results.csv")).splitlines()))
    assert len(rows) == 2 and summary["completed"] == 2
    # the finished trial was not trained again (Tune may rerun a trial whose end it had not yet
    # recorded; the trial sees its finished run and reports it instead of training)
    assert storage.read_text(history) == first_history
    assert storage.info(done[0]).mtime_ns == first_mtime
    if where == "s3":
        assert not list(tmp_path.iterdir())  # nothing of the sweep on local disk
    else:
        _resume_when_the_search_state_lags_the_trials(args, Path(out))


def _stale_search_state(tune_dir: Path, keep_trials: int, rewind: bool = True) -> tuple[str, str]:
    """What a driver killed mid-upload leaves in a bucket: Tune's trial file and its search state
    from different moments. ``rewind``: the search state goes back to the moment the first trial
    was proposed (it counts that trial as running, the second not yet proposed); else it stays
    ahead (both proposed). Tune's trial file keeps the first ``keep_trials`` trials, finished.
    Returns the two trials' ids."""
    import pickle

    from ray import cloudpickle

    from ray.tune.search.basic_variant import _VariantIterator
    from ray.tune.search.variant_generator import generate_variants

    search = sorted(tune_dir.glob("basic-variant-state-*.json"))[-1]
    state = pickle.loads(search.read_bytes())
    first = f"{state['_uuid_prefix']}00000"
    (it,) = state["_iterators"]
    if not rewind:
        assert it.counter == 2  # both proposed
    # rewound to just after the first proposal: the grid's variants regenerated, the first one spent
    variants = list(generate_variants(it.unresolved_spec, constant_grid_search=it.constant_grid_search,
                                      random_state=it.random_state))
    assert len(variants) == 2 and it.num_samples == 1
    if rewind:
        it.variants, it.num_samples_left, it.counter = _VariantIterator(variants[1:]), 0, 1
        state.update(_finished=False, _live_trials={first})
        search.write_bytes(cloudpickle.dumps(state))  # as Tune writes it
    trials = sorted(tune_dir.glob("experiment_state-*.json"))[-1]
    exp = json.loads(trials.read_text())
    exp["trial_data"].sort(key=lambda t: json.loads(t[0])["trial_id"])
    ids = [json.loads(t)["trial_id"] for t, _ in exp["trial_data"]]
    assert [json.loads(t)["status"] for t, _ in exp["trial_data"]] == ["TERMINATED"] * 2
    exp["trial_data"] = exp["trial_data"][:keep_trials]
    trials.write_text(json.dumps(exp))
    assert first == ids[0]
    return ids[0], ids[1]


def _resume_when_the_search_state_lags_the_trials(args: list[str], out: Path) -> None:
    """A sweep resumed from a search state older than Tune's trial file (a driver killed while its
    state was being uploaded) finishes: it neither waits forever for a trial it thinks is still
    running (Ray Tune's own generator does: the hang seen once in CI) nor trains a recorded trial
    again; a trial the lagging state had not yet proposed is proposed and run. A search state
    ahead of the trial file: the trial Tune lost is named in a warning."""
    from ray.train.constants import _get_ray_train_session_dir

    def run(what: str) -> str:
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{what}: the resumed sweep did not finish in 180 s")
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    histories = {p.parent.name: p.read_text() for p in (out / "trials").glob("*/history.csv")}
    assert len(histories) == 2
    # both trials recorded: the lagging state proposes neither again, and Tune waits for nothing
    _stale_search_state(out / "sweep", keep_trials=2)
    run("both trials recorded")
    rows = read_results(out)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}, rows
    assert {p.parent.name: p.read_text() for p in (out / "trials").glob("*/history.csv")} == histories  # none retrained
    # only the first recorded (the second had not begun): the second is proposed once and trains
    _, second = _stale_search_state(out / "sweep", keep_trials=1)
    number = second.rsplit("_", 1)[-1]
    (first,) = [n for n in histories if n.endswith("_00000")]  # names: settings, then the trial's number
    session = Path(_get_ray_train_session_dir())
    for d in [*out.glob(f"sweep/*_{number}*"), *out.glob(f"trials/*_{number}*"),
              *session.glob(f"*/sweep/driver_artifacts/*_{number}*")]:  # the last: Tune's local copy
        shutil.rmtree(d)
    run("one trial recorded")
    rows = read_results(out)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}, rows
    assert {r["trial"].split("_")[0] for r in rows} == {n.split("_")[0] for n in histories}
    now = {p.parent.name: p.read_text() for p in (out / "trials").glob("*/history.csv")}
    assert len(now) == 2 and now[first] == histories[first]  # the second trained anew; the first did not
    # the search state ahead of Tune's trial file (the second proposed, never recorded): its variant
    # is spent, so it cannot run again; the resume says so, naming it, and the results lack it
    _, second = _stale_search_state(out / "sweep", keep_trials=1, rewind=False)
    printed = run("the second trial proposed, not recorded")
    assert "never recorded" in printed and second in printed, printed[-2000:]
    assert [r["trial"] for r in read_results(out)] == [first]


def test_optuna_search(cache3, tmp_path):
    """``--search optuna``: Optuna proposes every trial from the three dimensions and the lr range."""
    from xray_dist.training.tune import sweep

    out = tmp_path / "optuna"
    cfg = SweepConfig(base=base(cache3, out, epochs=1), out=str(out), search="optuna", num_samples=3,
                      head_widths=(0, 8), num_classes=(2, 3), unfreeze_blocks=(0,), lr=(1e-4, 1e-3),
                      scheduler="fifo", max_concurrent=2)
    summary = sweep(cfg)
    rows = read_results(out)
    assert len(rows) == 3 and summary["completed"] == 3
    for r in rows:
        assert int(r["head_width"]) in (0, 8) and int(r["num_classes"]) in (2, 3) and r["unfreeze_blocks"] == "0"
        assert 1e-4 <= float(r["lr"]) <= 1e-3
    assert len({float(r["lr"]) for r in rows}) == 3  # sampled, not a grid
    assert json.loads((out / "best.json").read_text())["config"]["head_width"] in (0, 8)


def test_cached_features_and_in_process_runs_match_the_plain_run(cache3, tmp_path):
    """The sweep's two shortcuts change nothing but time. Frozen features: the same activations as
    the frozen base computes, the same trajectory and metrics as the uncached run, and an exported
    full model that reproduces the features-trained run. In-process trials: the same epochs as the
    Ray Train run."""
    import dataclasses

    import tf_keras as keras

    from xray_dist.data.cache import load_manifest, load_split_arrays
    from xray_dist.training.features import ensure_features
    from xray_dist.model.network import frozen_part
    from xray_dist.training.driver import train

    import shutil

    from xray_dist.data.cache import read_cache_parquet

    paths, images = load_split_arrays(cache3, "val")
    from xray_dist.model.precision import keras_policy

    keras.utils.set_random_seed(0)
    with keras_policy("float32"):
        direct = frozen_part(32, "none", 1)(images, training=False).numpy()
    rows = {}
    for where in ("ray", "here"):  # a Ray Data actor pool, or the frozen base in this process
        feats = ensure_features(cache3, "none", 0, 1, where=where, precision="float32")  # exact: float32
        # read back the way training reads them (Ray Data over the shards)
        batch = read_cache_parquet(Path(feats) / "shards", ["path", "x"], 0.25).take_batch(10_000, batch_format="numpy")
        rows[where] = len(batch["path"])
        by_path = dict(zip(batch["path"], batch["x"]))
        cached = np.stack([by_path[p] for p in paths])
        assert cached.shape == direct.shape and cached.dtype == np.float32
        np.testing.assert_allclose(cached, direct, rtol=1e-4, atol=1e-5)
        if where == "ray":
            shutil.rmtree(feats)
    assert rows["ray"] == rows["here"] == load_manifest(cache3).num_rows  # every usable image, no other
    from xray_dist.training.features import _single_cpu_node

    assert not _single_cpu_node()  # this two-node cluster: "auto" (the sweeps above) took the actor pool

    # Unfreeze depth 1 (block 5 trains on the block-4 features). Full-batch steps and no dropout
    # make the run independent of row order, which differs between the image and feature shards;
    # what is left between the two paths is float rounding, so "within noise" is tight here.
    cfg = base(cache3, tmp_path / "uncached", epochs=3, unfreeze_blocks=1, head_width=0, num_classes=2,
               batch_size=128, lr=3e-4, precision="float32")  # the shortcut's exactness is float32's
    plain = train(cfg)
    fast = train(dataclasses.replace(cfg, out=str(tmp_path / "cached"), features=str(feats)))
    assert plain.metrics["trainable_parameters"] == fast.metrics["trainable_parameters"]
    assert len(plain.history) == len(fast.history) == 3
    for a, b in zip(plain.history, fast.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
        assert b["val_auc_abnormal"] == pytest.approx(a["val_auc_abnormal"], abs=0.02)
    # the weights moved: a run that learned nothing would match trivially
    assert plain.history[-1]["loss"] != pytest.approx(plain.history[0]["loss"], rel=1e-3)
    # the same training loop run in this process (as one-worker sweep trials run), on features
    from xray_dist.training.inprocess import train_in_process

    seen = []
    local_cfg = dataclasses.replace(cfg, out=str(tmp_path / "inprocess"), features=str(feats))
    result, _, _ = train_in_process(local_cfg, on_report=seen.append)
    assert result.error is None and [m["epoch"] for m in seen] == [1, 2, 3]
    for a, b in zip(plain.history, seen):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
        assert b["val_auc_abnormal"] == pytest.approx(a["val_auc_abnormal"], abs=0.02)
    # a trial the scheduler stops ends at the next batch, without another report or checkpoint
    from xray_dist.errors import RunStopped

    stopped_cfg = dataclasses.replace(local_cfg, out=str(tmp_path / "stopped"), batch_size=8)
    reports = []
    with pytest.raises(RunStopped):
        train_in_process(stopped_cfg, on_report=reports.append, should_stop=lambda: len(reports) >= 1)
    assert [m["epoch"] for m in reports] == [1]
    assert [p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()] == ["epoch_0001"]
    # the exported model of the cached run is a full model: predict on images reproduces its validation AUROC
    from xray_dist.results.metrics import auroc
    from xray_dist.model.artifacts import load_run_model, predict_arrays

    lm = load_run_model(tmp_path / "cached")
    m = load_manifest(cache3).to_pandas().set_index("path")
    y = np.array([m.loc[p, "label"] != "normal" for p in paths])
    probs = predict_arrays(lm, images)
    assert auroc(y, 1 - probs[:, 0]) == pytest.approx(fast.metrics["val_auc_abnormal"], abs=1e-6)
    # its compact form (the trained top: block 5 + head, as sweep trials export) rebuilds the same model
    top_only = tmp_path / "top_only"
    shutil.copytree(tmp_path / "cached" / "model", top_only)
    (top_only / "weights.h5").unlink()
    # block 5 holds 7.1 M of VGG16's 14.7 M weights: the top is about half the full file at depth 1
    assert (top_only / "top_weights.h5").stat().st_size < 0.6 * (tmp_path / "cached" / "model" / "weights.h5").stat().st_size
    np.testing.assert_allclose(predict_arrays(load_run_model(top_only), images), probs, atol=1e-6)
    from xray_dist.model.artifacts import materialize_full_model

    materialize_full_model(top_only)
    np.testing.assert_allclose(predict_arrays(load_run_model(top_only), images), probs, atol=1e-6)


def test_asha_never_stops_a_trial_at_its_last_epoch():
    """Grace 3, max 6: Ray's ASHA has a rung at 6 too; a trial reporting epoch 6 must finish (and
    export), while a weak trial at the epoch-3 rung is still stopped."""
    from ray.tune.schedulers import TrialScheduler

    from xray_dist.training.tune import _FinishingASHA

    class Trial:
        def __init__(self, i):
            self.trial_id = str(i)

    s = _FinishingASHA(time_attr="epoch", max_t=6, grace_period=3, reduction_factor=2, stop_last_trials=False,
                       metric="val_auc_abnormal", mode="max")
    trials = [Trial(i) for i in range(3)]
    for t in trials:
        s.on_trial_add(None, t)
    at3 = [s.on_trial_result(None, t, {"epoch": 3, "val_auc_abnormal": v}) for t, v in zip(trials, (0.9, 0.5, 0.95))]
    assert at3 == [TrialScheduler.CONTINUE, TrialScheduler.STOP, TrialScheduler.CONTINUE]
    at6 = [s.on_trial_result(None, t, {"epoch": 6, "val_auc_abnormal": v}) for t, v in zip(trials, (0.1, 0.3))]
    assert at6 == [TrialScheduler.CONTINUE] * 2


class TestConcurrencyOnAutoscalingClusters:
    """--max-concurrent's default comes from the autoscaler's view when the cluster can grow."""

    @staticmethod
    def sweep_cfg(**kw):
        return SweepConfig(base=TrainConfig(cache="c", out="o", **kw), out="o")

    @pytest.mark.parametrize("head_cpus", [0.0, 1.0])
    def test_an_empty_autoscaling_cluster_is_not_one_trial_at_a_time(self, head_cpus):
        from xray_dist.training.tune import concurrency_choice

        cfg = self.sweep_cfg(gpus_per_worker=1)
        n, why = concurrency_choice(cfg, {"CPU": head_cpus}, trials=6, max_resources={"GPU": 16, "CPU": 192})
        assert n == 6 and "autoscaler" in why  # 16 GPUs could run 16 one-GPU trials; there are 6
        n, why = concurrency_choice(cfg, {"CPU": head_cpus}, trials=30, max_resources={"GPU": 16, "CPU": 192})
        assert n == 16

    def test_fixed_clusters_count_what_is_there(self):
        from xray_dist.training.tune import concurrency_choice

        cfg = self.sweep_cfg(cpus_per_worker=1.0)
        n, why = concurrency_choice(cfg, {"CPU": 4}, trials=10, max_resources=None)
        assert n == 3 and "4 CPU" in why  # 1 CPU per trial + 0.25 for its Ray Data task
        n, why = concurrency_choice(cfg, {"CPU": 0}, trials=10, max_resources=None)
        assert n == 1 and "cannot grow" in why
        # an autoscaler that cannot add more than is there changes nothing
        assert concurrency_choice(cfg, {"CPU": 4}, trials=10, max_resources={"CPU": 4})[0] == 3


def test_sweep_with_no_completed_trial_fails_and_a_changed_sweep_is_not_resumed(cache3, tmp_path, capsys):
    """Every trial failing exits non-zero and removes an older best.json; resuming the sweep with
    another search space or other base settings is refused, naming the differences."""
    from xray_dist.cli.app import main

    out = tmp_path / "sweep"
    out.mkdir()
    (out / "best.json").write_text('{"stale": true}')  # as an older sweep in this directory left it
    argv = ["tune", "--cache", str(cache3), "--out", str(out), "--epochs", "1", "--weights", "none",
            "--head-widths", "0", "--num-classes", "7", "--unfreeze-blocks", "0", "--scheduler", "fifo",
            "--batch-size", "8", "--cpus-per-worker", "0.5", "--max-failures", "0"]
    assert main(argv) == 1  # K = 7 needs seven labels: the cache has three, so the only trial fails
    assert "no trial completed" in capsys.readouterr().err
    rows = read_results(out)
    assert [r["status"] for r in rows] == ["failed"] and not (out / "best.json").exists()
    assert main([*argv[:-6], "--head-widths", "0,8", *argv[-6:]]) == 2  # another search space
    err = capsys.readouterr().err
    assert "holds a sweep with other settings" in err and "head_widths: [0] -> [0, 8]" in err
    assert main([*argv, "--lr", "3e-4"]) == 2 and "lr:" in capsys.readouterr().err
    assert main([*argv, "--batch-size", "16"]) == 2  # a base setting every trial shares
    assert "batch_size: 8 -> 16" in capsys.readouterr().err
    started = next((out / "trials").glob("*/config.json"))  # written when the trial starts
    first = started.stat().st_mtime_ns
    assert main([*argv, "--max-concurrent", "1"]) == 1  # what may change: how many trials at a time
    assert started.stat().st_mtime_ns == first  # resumed: the failed trial is not run again...
    assert read_results(out)[0]["num_classes"] == "7"  # its row keeps its parameters (Tune gives none)
    assert main([*argv, "--resume-errored"]) == 1
    assert started.stat().st_mtime_ns > first  # ...unless asked to
    assert [r["status"] for r in read_results(out)] == ["failed"]
