"""xray_dist.inprocess: the session that lets one-worker sweep trials train in their own process.

The whole path (a sweep whose trials train in their Tune processes, and the same run as Ray Train
gives) is exercised in tests/test_tune.py; here, what it keeps on disk and resumes from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from xray_dist.config import TrainConfig
from xray_dist.inprocess import InProcessSession, can_run_in_process


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
    from xray_dist.train import _best_checkpoint

    with _best_checkpoint(result, "val_auc_abnormal").as_directory() as d:  # what export_run picks
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
