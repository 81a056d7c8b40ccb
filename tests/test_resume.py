"""Exact resume: a run stopped after epoch k and resumed is the run it would have been.

What the next epoch needs travels in the checkpoint (weights, Adam's moments and step counter,
the dropout generator's state, the epoch and history), and the training order is a function of
(seed, epoch) alone. Here a one-worker run in this process (what a sweep trial is); the Ray Train
paths (a worker killed mid-run, a rerun with the same ``--out``) are in tests/test_train.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from xray_dist.config import TrainConfig

pytestmark = pytest.mark.slow


def in_process(cache, out, epochs: int, read_h5) -> tuple:
    """(final weights, history) of a one-worker run in this process, as a sweep trial trains."""
    import json

    from xray_dist.inprocess import train_in_process

    # a hidden layer, so dropout draws random numbers; two trainable blocks; 8 steps an epoch
    cfg = TrainConfig(cache=str(cache), out=str(out), epochs=epochs, batch_size=4, lr=1e-4, weights="none",
                      head_width=8, dropout=0.5, unfreeze_blocks=2, seed=5)
    result, _, _ = train_in_process(cfg)
    with result.checkpoint.as_directory() as d:
        return read_h5(Path(d) / "weights.h5"), json.loads((Path(d) / "state.json").read_text())["history"]


def test_a_trial_stopped_after_epoch_2_and_resumed_ends_where_the_uninterrupted_one_ends(
        prepared_binary, tmp_path, same_run, read_h5):
    _, cache = prepared_binary
    whole = in_process(cache, tmp_path / "whole", 4, read_h5)
    again = in_process(cache, tmp_path / "again", 4, read_h5)
    same_run(whole, again)  # deterministic: the comparison below means something
    first = in_process(cache, tmp_path / "cut", 2, read_h5)
    assert [h["epoch"] for h in first[1]] == [1, 2]
    resumed = in_process(cache, tmp_path / "cut", 4, read_h5)  # the same --out: resumes after epoch 2
    assert [h["epoch"] for h in resumed[1]] == [1, 2, 3, 4] and resumed[1][:2] == first[1]  # 1-2 not retrained
    same_run(whole, resumed)


def test_a_trial_cut_between_its_last_checkpoint_and_its_export_reports_its_end(prepared_binary, tmp_path):
    """A sweep trial killed after its last epoch's checkpoint but before its export is run again
    by Tune: it has nothing left to train, and must still report its last epoch (Tune fails a trial
    whose result lacks the sweep's metric — seen once in CI)."""
    from xray_dist.inprocess import train_in_process

    cfg = TrainConfig(cache=str(prepared_binary[1]), out=str(tmp_path / "t"), epochs=1, batch_size=8, lr=1e-4,
                      weights="none", unfreeze_blocks=1)
    first: list[dict] = []
    train_in_process(cfg, on_report=first.append)
    again: list[dict] = []
    result, _, _ = train_in_process(cfg, on_report=again.append)  # the rerun: the checkpoint holds epoch 1
    assert [m["epoch"] for m in again] == [1] and again[0]["val_auc_abnormal"] == first[0]["val_auc_abnormal"]
    assert result.checkpoint is not None
