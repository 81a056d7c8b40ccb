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


def test_a_train_run_and_its_resume_are_one_mlflow_run_and_its_credentials_are_never_written(
        mlflow_server, ray_cluster, prepared_binary, synth_binary, tmp_path, monkeypatch, capfd):
    """A train command (its own process) logs to a server named with credentials: one MLflow run with
    per-epoch metrics, parameters and artifacts, nothing identifying sent, and the password in no
    file of the run, no log line and nothing printed. Resumed with more epochs, the URI given again
    by MLFLOW_TRACKING_URI, it goes on in the same MLflow run, found through the masked mlflow.json:
    epochs 1-2 not logged twice, no new run, and still no password written."""
    import os
    import secrets
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient
    from test_leaks import _found, _leaks

    from xray_dist.results.tracking import RUN_FILE

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, cache = prepared_binary
    password = "s3cr3tpw" + secrets.token_hex(4)
    uri = mlflow_server.replace("http://", f"http://xray:{password}@")
    out, logs = tmp_path / "run", tmp_path / "logs"
    args = ["train", "--cache", str(cache), "--out", str(out), "--batch-size", "8", "--weights", "none",
            "--unfreeze-blocks", "1", "--cpus-per-worker", "0.5"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "XRAY_DIST_LOG_DIR": str(logs)}
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run([sys.executable, "-m", "xray_dist.cli", *args, "--epochs", "2", "--mlflow", uri],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    saved = json.loads((out / RUN_FILE).read_text())
    assert saved["uri"] == mlflow_server.replace("http://", "http://***@")
    rid = saved["run_id"]
    client = MlflowClient(mlflow_server)  # the credentials did reach the server: the run is there
    exp = client.get_experiment_by_name("xray-dist")
    # the experiment is shared with other tests' runs on the session's server: this run is the one
    # its mlflow.json names, and no other run was made for it
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_id == rid]
    before = {r.info.run_id for r in client.search_runs([exp.experiment_id])}
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(rid, "val_auc_abnormal")] == [1, 2]
    p_ = run.data.params
    assert p_["epochs"] == "2" and p_["weights"] == "none" and p_["unfreeze_blocks"] == "1" and p_["task"] == "auto"
    assert p_["cache_fingerprint"] == json.loads((out / "metrics.json").read_text())["cache_fingerprint"]
    arts = {a.path for a in client.list_artifacts(rid)} | {a.path for a in client.list_artifacts(rid, "model")}
    assert {"training_curves.png", "roc.png", "metrics.json", "history.csv", "report.html",
            "model/model_spec.json"} <= arts
    sent = everything_sent(client, run)
    for secret in (str(tmp_path), str(cache), "Synthetic^", *set(synth_binary.patients.values())):
        assert secret not in sent, secret
    assert (out / "config.json").is_file() and (out / "xray-dist.log").is_file()
    needles = (password, "xray:")
    assert not _found(p.stdout + p.stderr, needles)
    assert not _leaks([out, logs] if logs.exists() else [out], needles)

    # resumed with more epochs, the URI (with its credentials) from the environment this time
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    capfd.readouterr()
    assert cli.main([*args, "--epochs", "3"]) == 0
    assert {r.info.run_id for r in client.search_runs([exp.experiment_id])} == before  # no new run
    again = client.get_run(rid)
    assert again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(rid, "val_auc_abnormal")] == [1, 2, 3]
    printed = capfd.readouterr()
    assert not _found(printed.out + printed.err, needles)
    assert not _leaks([out], needles)


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
