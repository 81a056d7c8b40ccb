"""Experiment tracking against a real MLflow server: a train run (and its resume) is one MLflow
run with per-epoch metrics, parameters and artifacts; a sweep logs each trial; nothing
identifying reaches the server."""

from __future__ import annotations

import json

import pytest

from xray_dist.cli import app as cli

pytestmark = pytest.mark.slow


def everything_sent(client, run) -> str:
    """Every parameter, tag, metric name and text artifact of ``run``, as one string."""
    import tempfile
    from pathlib import Path

    parts = [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(sorted(run.data.metrics))]
    with tempfile.TemporaryDirectory() as d:
        local = Path(client.download_artifacts(run.info.run_id, "", d))
        for f in local.rglob("*"):
            if f.is_file() and f.suffix in (".json", ".csv", ".html"):
                parts.append(f.read_text(errors="replace"))
    return "\n".join(parts)


def test_a_train_run_and_its_resume_are_one_mlflow_run(mlflow_server, prepared_binary, synth_binary, tmp_path,
                                                         monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, cache = prepared_binary
    out = tmp_path / "run"
    args = ["train", "--cache", str(cache), "--out", str(out), "--batch-size", "8", "--weights", "none",
            "--unfreeze-blocks", "1", "--cpus-per-worker", "0.5", "--mlflow", mlflow_server]
    assert cli.main([*args, "--epochs", "2"]) == 0
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("xray-dist")
    rid = json.loads((out / "mlflow.json").read_text())["run_id"]
    # the experiment is shared with other tests' runs on the session's server: this run is the one
    # its mlflow.json names, and no other run was made for it
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_id == rid]
    before = {r.info.run_id for r in client.search_runs([exp.experiment_id])}
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(rid, "val_auc_abnormal")] == [1, 2]
    p = run.data.params
    assert p["epochs"] == "2" and p["weights"] == "none" and p["unfreeze_blocks"] == "1" and p["task"] == "auto"
    assert p["cache_fingerprint"] == json.loads((out / "metrics.json").read_text())["cache_fingerprint"]
    arts = {a.path for a in client.list_artifacts(rid)} | {a.path for a in client.list_artifacts(rid, "model")}
    assert {"training_curves.png", "roc.png", "metrics.json", "history.csv", "report.html",
            "model/model_spec.json"} <= arts
    sent = everything_sent(client, run)
    for secret in (str(tmp_path), str(cache), "Synthetic^", *set(synth_binary.patients.values())):
        assert secret not in sent, secret

    # resumed with more epochs: the same MLflow run goes on (epochs 1-2 are not logged twice)
    assert cli.main([*args, "--epochs", "3"]) == 0
    assert {r.info.run_id for r in client.search_runs([exp.experiment_id])} == before  # no new run
    again = client.get_run(rid)
    assert again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(rid, "val_auc_abnormal")] == [1, 2, 3]


def test_each_sweep_trial_is_a_run(mlflow_server, prepared_binary, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # the environment variable works as the flag does
    _, cache = prepared_binary
    out = tmp_path / "sweep_t"
    assert cli.main(["tune", "--cache", str(cache), "--out", str(out), "--epochs", "2", "--batch-size", "8",
                     "--weights", "none", "--combos", "0:2:0,8:2:0", "--lr", "1e-3,1e-3", "--scheduler", "fifo",
                     "--cpus-per-worker", "0.5"]) == 0
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("xray-dist-sweep-sweep_t")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2
    for r in runs:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_auc_abnormal")] == [1, 2]
        assert str(tmp_path) not in json.dumps(r.data.params) + json.dumps(r.data.tags)


def test_a_train_run_whose_workers_fail_is_marked_failed(mlflow_server, prepared_binary, tmp_path, monkeypatch,
                                                          capsys):
    """Workers that fail for good — a weights file that is not VGG16's, so the worker raises while
    building its model, and ``--max-failures 0`` starts no other — end the command with that error,
    and the run's MLflow run is marked FAILED on the server instead of being left RUNNING."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, cache = prepared_binary
    bad = tmp_path / "not_vgg16.h5"
    bad.write_bytes(b"not an HDF5 file")  # exists, so the driver starts the run; only a worker opens it
    out = tmp_path / "failing"
    code = cli.main(["train", "--cache", str(cache), "--out", str(out), "--epochs", "1", "--batch-size", "8",
                     "--weights", str(bad), "--unfreeze-blocks", "1", "--cpus-per-worker", "0.5",
                     "--max-failures", "0", "--mlflow", mlflow_server])
    assert code != 0
    assert "not VGG16 no-top weights" in capsys.readouterr().err  # the worker's failure, not another one
    rid = json.loads((out / "mlflow.json").read_text())["run_id"]
    client = MlflowClient(mlflow_server)
    run = client.get_run(rid)
    assert run.info.status == "FAILED"
    assert client.get_metric_history(rid, "val_auc_abnormal") == []  # no epoch was trained
    assert not (out / "metrics.json").exists()  # nothing was exported
