"""xray_dist.training.inprocess: the session that lets one-worker sweep trials train in their own process.

The whole path (a sweep whose trials train in their Tune processes, and the same run as Ray Train
gives) is exercised in tests/test_tune.py; here, what it keeps on disk and resumes from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from xray_dist.config import TrainConfig
from xray_dist.training.inprocess import InProcessSession, can_run_in_process


def report_epochs(session: InProcessSession, tmp: Path, scores) -> None:
    history = []
    for epoch, score in enumerate(scores, start=1):
        metrics = {"epoch": epoch, "val_auc_abnormal": score, "loss": 1.0 / epoch}
        history.append(metrics)
        d = tmp / f"ckpt{epoch}"
        d.mkdir()
        (d / "state.json").write_text(json.dumps({"epoch": epoch, "history": history}))
        (d / "weights.h5").write_bytes(bytes([epoch]))
        session.report(metrics, d)


def test_keeps_the_best_and_the_latest_and_reports_every_epoch(tmp_path):
    seen = []
    s = InProcessSession({}, tmp_path / "store", "val_auc_abnormal", on_report=seen.append)
    report_epochs(s, tmp_path, [0.5, 0.9, float("nan"), 0.7, 0.6])
    assert [m["epoch"] for m in seen] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["epoch_0002", "epoch_0005"]
    with s.get_checkpoint().as_directory() as d:  # resume from the latest
        assert (Path(d) / "weights.h5").read_bytes() == bytes([5])
    result = s.result()
    assert result.error is None
    assert [m["epoch"] for _, m in result.best_checkpoints] == [2, 5]
    from xray_dist.training.export import best_checkpoint

    with best_checkpoint(result, "val_auc_abnormal").as_directory() as d:  # what export_run picks
        assert (Path(d) / "weights.h5").read_bytes() == bytes([2])


def test_nan_never_wins_and_no_checkpoint_is_an_error(tmp_path):
    s = InProcessSession({}, tmp_path / "store", "val_auc_abnormal")
    assert s.get_checkpoint() is None and s.result().error is not None
    report_epochs(s, tmp_path, [float("nan"), 0.1])
    assert [m["epoch"] for _, m in s.result().best_checkpoints] == [2]
    assert not math.isnan(s.result().best_checkpoints[0][1]["val_auc_abnormal"])


def test_a_rerun_resumes_from_what_was_saved(tmp_path):
    store = tmp_path / "store"
    report_epochs(InProcessSession({}, store, "val_auc_abnormal"), tmp_path, [0.8, 0.6, 0.7])
    (store / ".writing_0004").mkdir()  # killed while copying epoch 4
    (store / ".writing_0004" / "weights.h5").write_bytes(b"partial")
    again = InProcessSession({}, store, "val_auc_abnormal")
    assert not (store / ".writing_0004").exists()
    with again.get_checkpoint().as_directory() as d:
        assert json.loads((Path(d) / "state.json").read_text())["epoch"] == 3
    assert [m["epoch"] for _, m in again.result().best_checkpoints] == [1, 3]


@pytest.mark.parametrize("kw,ok", [({}, True), ({"num_workers": 2}, False), ({"cpu_replicas": 2}, False)])
def test_only_one_worker_runs_in_process(kw, ok):
    assert can_run_in_process(TrainConfig(cache="c", out="o", **kw)) is ok


@pytest.mark.slow
def test_local_splits_hold_the_rows_the_ray_datasets_give(prepared_binary, tmp_path):
    """In-process runs read small splits with pyarrow instead of Ray Data (whose first pass in a
    fresh trial process costs seconds): the same rows, labels and weights, every row once per
    pass, shuffled reproducibly; a split over ``worker_cache_mb`` stays a Ray Dataset."""
    import dataclasses

    import numpy as np

    from xray_dist.data.classes import ClassScheme
    from xray_dist.training.inprocess import LocalSplit, in_process_inputs
    from xray_dist.training.inputs import run_inputs, run_setup

    _, cache = prepared_binary
    cfg = TrainConfig(cache=str(cache), out=str(tmp_path / "run"), weights="none")
    _, _, class_weight = run_setup(cfg)
    _, _, local, loop_local = in_process_inputs(cfg)
    _, _, remote, loop_remote = run_inputs(cfg)
    assert all(isinstance(d, LocalSplit) for d in local.values())
    assert loop_local["n_train"] == loop_remote["n_train"] and loop_local["scheme"] == loop_remote["scheme"]

    def rows(batches):
        bs = list(batches)
        x = np.concatenate([b["x"] for b in bs])
        key = np.argsort([hash(r.tobytes()) for r in x])
        return x[key], np.concatenate([b["label"] for b in bs])[key], np.concatenate([b["weight"] for b in bs])[key]

    for name in ("train", "val"):
        a = rows(local[name].iter_batches(batch_size=7))
        b = rows(remote[name].iter_batches(batch_size=7, batch_format="numpy"))
        assert a[0].shape == b[0].shape and a[0].dtype == b[0].dtype == np.uint8 and len(a[0]) > 0
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
        assert len(set(a[1].tolist())) == 2
        np.testing.assert_allclose(a[2], [class_weight[int(c)] for c in a[1]])  # each row its class's weight
    split = local["train"]
    first = [b["x"] for b in split.iter_batches(batch_size=5, local_shuffle_buffer_size=64, local_shuffle_seed=1)]
    again = [b["x"] for b in split.iter_batches(batch_size=5, local_shuffle_buffer_size=64, local_shuffle_seed=1)]
    other = [b["x"] for b in split.iter_batches(batch_size=5, local_shuffle_buffer_size=64, local_shuffle_seed=2)]
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
    assert not np.array_equal(np.concatenate(first), np.concatenate(other))
    np.testing.assert_array_equal(rows([{"x": x, "label": np.zeros(len(x)), "weight": np.zeros(len(x))}
                                        for x in first])[0], rows(split.iter_batches(batch_size=64))[0])
    dropped = list(split.iter_batches(batch_size=5, drop_last=True))
    assert all(len(b["x"]) == 5 for b in dropped) and len(dropped) == loop_local["n_train"] // 5
    from xray_dist.errors import CacheError
    from xray_dist.training.pipeline import split_source
    from xray_dist.data.cache import split_labels

    scheme = ClassScheme.from_dict(loop_local["scheme"])
    source, column = split_source(cache, None)
    label_of = {**split_labels(cache, "val", scheme), "images/not_in_cache.dcm": 0}
    with pytest.raises(CacheError, match="1 of the split's .* images have no row there .*not_in_cache.dcm"):
        LocalSplit(source, column, label_of, class_weight)
    _, _, big, _ = in_process_inputs(dataclasses.replace(cfg, worker_cache_mb=0))
    assert not isinstance(big["train"], LocalSplit)


def test_train_runner_inprocess_trains_here_resumes_and_keeps_its_runner(prepared_binary, tmp_path, capsys):
    """``train --runner inprocess``: the run trains in the command's own process (its worker record
    is this process), writes what a Ray Train run writes (checkpoints under RUN/checkpoints, no Ray
    Train storage), resumes with more epochs without training epoch 1 again, and a rerun with the
    other runner is refused (one line naming it); more than one worker is refused up front."""
    import csv
    import json
    import os

    from xray_dist.cli.app import main
    from xray_dist.config import ConfigError, TrainConfig

    _, cache = prepared_binary
    out = tmp_path / "run"
    argv = ["train", "--cache", str(cache), "--out", str(out), "--batch-size", "8", "--weights", "none",
            "--unfreeze-blocks", "1"]
    assert main([*argv, "--runner", "inprocess", "--epochs", "1"]) == 0
    assert json.loads((out / "workers" / "rank0.json").read_text())["pid"] == os.getpid()
    assert (out / "checkpoints").is_dir() and not (out / "ray").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs"] == 1 and m["config"]["runner"] == "inprocess" and m["cache_fingerprint"]
    assert {"model/weights.h5", "model/model_spec.json", "history.csv", "val_scores.npz", "roc.png"} <= {
        str(p.relative_to(out)) for p in out.rglob("*")}
    first = list(csv.DictReader(open(out / "history.csv")))
    assert main([*argv, "--runner", "inprocess", "--epochs", "2"]) == 0
    second = list(csv.DictReader(open(out / "history.csv")))
    assert [r["epoch"] for r in second] == ["1", "2"] and second[0] == first[0]  # epoch 1 not trained again
    capsys.readouterr()
    assert main([*argv, "--epochs", "3"]) == 2  # Ray Train would start this run over: refused
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runner" in err[0], err
    with pytest.raises(ConfigError, match="runner"):
        TrainConfig(cache=str(cache), out=str(out), runner="inprocess", num_workers=2)
