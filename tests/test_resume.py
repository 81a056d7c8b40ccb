"""Exact resume: a run stopped after epoch k and resumed is the run it would have been.

What the next epoch needs travels in the checkpoint (weights, Adam's moments and step counter,
the dropout generator's state, the epoch and history), and the training order is a function of
(seed, epoch) alone. Here a one-worker run in this process (what a sweep trial is); the Ray Train
paths (a worker killed mid-run, a rerun with the same ``--out``) are in tests/test_train.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xray_dist.config import TrainConfig

pytestmark = pytest.mark.slow


def in_process(cache, out, epochs: int, read_h5) -> tuple:
    """(final weights, history) of a one-worker run in this process, as a sweep trial trains."""
    import json

    from xray_dist.training.inprocess import train_in_process

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
    assert_bitwise(whole, again)  # same cache and seed, same model on CPU: bit for bit
    first = in_process(cache, tmp_path / "cut", 2, read_h5)
    assert [h["epoch"] for h in first[1]] == [1, 2]
    resumed = in_process(cache, tmp_path / "cut", 4, read_h5)  # the same --out: resumes after epoch 2
    assert [h["epoch"] for h in resumed[1]] == [1, 2, 3, 4] and resumed[1][:2] == first[1]  # 1-2 not retrained
    same_run(whole, resumed)
    assert_bitwise(whole, resumed)


def assert_bitwise(a: tuple, b: tuple) -> None:
    """Two runs' (weights by name, history) equal to the last bit: no tolerance at all (the
    history's wall-clock fields aside)."""
    import numpy as np

    (wa, ha), (wb, hb) = a, b
    clock = {"epoch_seconds", "images_per_s"}
    assert [{k: v for k, v in h.items() if k not in clock} for h in ha] == \
        [{k: v for k, v in h.items() if k not in clock} for h in hb]
    assert sorted(wa) == sorted(wb) and len(wa) > 0
    for name in wa:
        assert wa[name].dtype == wb[name].dtype and np.array_equal(wa[name], wb[name]), name
        assert wa[name].tobytes() == wb[name].tobytes(), name


def test_a_trial_cut_between_its_last_checkpoint_and_its_export_reports_its_end(prepared_binary, tmp_path):
    """A sweep trial killed after its last epoch's checkpoint but before its export is run again
    by Tune: it has nothing left to train, and must still report its last epoch (Tune fails a trial
    whose result lacks the sweep's metric — seen once in CI)."""
    from xray_dist.training.inprocess import train_in_process

    cfg = TrainConfig(cache=str(prepared_binary[1]), out=str(tmp_path / "t"), epochs=1, batch_size=8, lr=1e-4,
                      weights="none", unfreeze_blocks=1)
    first: list[dict] = []
    train_in_process(cfg, on_report=first.append)
    again: list[dict] = []
    result, _, _ = train_in_process(cfg, on_report=again.append)  # the rerun: the checkpoint holds epoch 1
    assert [m["epoch"] for m in again] == [1] and again[0]["val_auc_abnormal"] == first[0]["val_auc_abnormal"]
    assert result.checkpoint is not None


def test_a_changed_cache_stops_a_resumed_sweep_and_a_rerun_train(ray_cluster, tmp_path, capsys):
    """``tune`` resumed into its SWEEP directory and ``train`` rerun into its run directory, after the
    cache was prepared again with one label changed, then after one file changed on disk (so its
    image is decoded again): each is refused before it trains, exit 2, one line naming the change
    and the directory; the run and the sweep are left as they were. With the original files and
    labels prepared again, the fingerprint is the recorded one (it is the content that counts)."""
    import csv
    import os

    from xray_dist.data import fingerprint
    from xray_dist.cli.app import main
    from xray_dist.data.synth import synthesize

    syn = synthesize(tmp_path / "data", patients=8, images_per_patient=2, size=64, seed=7)
    cache, run, sweep = tmp_path / "cache", tmp_path / "run", tmp_path / "sweep"

    def prepare(labels: Path) -> None:
        assert main(["prepare", str(syn.out), "--labels", str(labels), "--out", str(cache), "--image-size", "32",
                     "--seed", "1"]) == 0

    prepare(syn.labels_csv)
    train = ["train", "--cache", str(cache), "--out", str(run), "--weights", "none", "--batch-size", "8",
             "--runner", "inprocess", "--unfreeze-blocks", "0"]  # the refusal comes before any runner
    tune = ["tune", "--cache", str(cache), "--out", str(sweep), "--epochs", "1", "--weights", "none", "--combos",
            "0:2:0", "--lr", "1e-3,1e-3", "--scheduler", "fifo", "--batch-size", "8", "--cpus-per-worker", "0.5"]
    assert main([*train, "--epochs", "1"]) == 0
    assert main(tune) == 0
    before = {p: p.read_bytes() for p in (run / "history.csv", run / "inputs.json", sweep / "results.csv",
                                          sweep / "inputs.json")}

    def refused(argv: list[str], what: str, target: Path, change: str) -> None:
        capsys.readouterr()  # prepare's lines
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert f"changed since the {what} in {target} started from it" in err[0] and change in err[0], err[0]

    # another label for one image (the split may follow the labels; the labels are named in any case)
    relabelled = tmp_path / "relabelled.csv"
    rows = list(csv.reader(syn.labels_csv.open()))
    flip = next(i for i, r in enumerate(rows) if r[1] == "normal")
    rows[flip][1] = "finding"
    with relabelled.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    prepare(relabelled)
    refused([*train, "--epochs", "2"], "run", run, fingerprint.PARTS["labels"])
    refused(tune, "sweep", sweep, fingerprint.PARTS["labels"])

    prepare(syn.labels_csv)  # as it was: nothing to refuse
    for target, what in ((run, "run"), (sweep, "sweep")):
        assert fingerprint.check_unchanged(str(target), str(cache), what)["id"] == json.loads(
            (target / "inputs.json").read_text())["cache_fingerprint"]["id"]

    # one file rewritten since (same bytes, a new modification time): prepare decodes it again
    touched = syn.files[0]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    prepare(syn.labels_csv)
    refused([*train, "--epochs", "2"], "run", run, fingerprint.PARTS["images"])
    refused(tune, "sweep", sweep, fingerprint.PARTS["images"])
    assert {p: p.read_bytes() for p in before} == before  # neither trained nor rewrote anything
