"""Experiment tracking with MLflow (the optional extra ``xray-dist[mlflow]``: the client only).

``--mlflow URI`` (or ``MLFLOW_TRACKING_URI``) logs every ``train`` run as one MLflow run: the
driver creates it (or finds it again when the same ``--out`` resumes: ``RUN/mlflow.json``), rank 0
logs each epoch's metrics as the epoch ends, and the driver logs the artifacts when the run is
exported: the model's spec, the plots, ``metrics.json``, ``history.csv`` and a shareable report. A
sweep logs each trial as a run of one experiment named after the sweep, through Ray Tune's
``MLflowLoggerCallback``.

A tracking URI may carry credentials (``http://user:password@host``, ``?token=...``): they are
used to talk to the server and never written or logged — ``RUN/mlflow.json``, the log and the
errors hold the URI masked (:func:`xray_dist.infra.redaction.mask_credentials`), and a resumed run is
given the URI again (``--mlflow`` or ``MLFLOW_TRACKING_URI``) and recognises its MLflow run by
the masked form.

Nothing identifying leaves: parameters are the training settings that are numbers or choices
(no path — the cache, the run directory and a weights file are named by what they are, not
where); the dataset appears as its counts and the cache's fingerprint; the report has no file
names; the model's spec has no path.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import time
from pathlib import Path

from xray_dist.errors import XrayDistError
from xray_dist.infra import storage
from xray_dist.infra.redaction import MASK, mask_credentials
from xray_dist.model.artifacts import SPEC_FILE, read_spec, run_model_dir
from xray_dist.results import runs
from xray_dist.results.report import write_report

log = logging.getLogger(__name__)

RUN_FILE = "mlflow.json"
#: TrainConfig fields logged as parameters: settings, never locations.
PARAMS = ("epochs", "batch_size", "lr", "head_width", "dropout", "num_classes", "negative_class", "task",
          "unfreeze_blocks", "num_workers", "gpus_per_worker", "cpus_per_worker", "cpu_replicas", "seed", "metric",
          "precision", "worker_cache_mb", "placement_strategy")


def tracking_uri(flag: str | None) -> str | None:
    """``--mlflow``, else ``MLFLOW_TRACKING_URI``, else None (no tracking)."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or None


def _client(uri: str):
    try:  # MLflow: an optional extra, imported when tracking is asked for
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise XrayDistError("--mlflow needs the MLflow client: pip install 'xray-dist[mlflow]'") from None
    return MlflowClient(tracking_uri=uri)


def weights_kind(weights: str) -> str:
    return weights if weights in ("imagenet", "none") else "file"


def params_of(cfg) -> dict[str, str]:
    """The run's parameters as MLflow takes them (strings), without any path."""
    out = {k: str(getattr(cfg, k)) for k in PARAMS}
    out["weights"] = weights_kind(cfg.weights)
    out["frozen_features"] = str(bool(cfg.features))
    return out


def start_train_run(cfg, fingerprint_id: str, dataset: dict) -> dict | None:
    """The MLflow run of a train run (created, or the one a resumed run logged to), as
    ``{"uri", "run_id"}`` for the workers; None without a tracking URI. A server that cannot be
    reached stops the command before training, with one line (tracking was asked for)."""
    uri = tracking_uri(cfg.mlflow)
    if not uri:
        return None
    client = _client(uri)
    try:
        return _start(client, uri, cfg, fingerprint_id, dataset)
    except XrayDistError:
        raise
    except Exception as e:  # noqa: BLE001 - the server's, or the network's, failure: one line naming it
        raise XrayDistError(f"--mlflow {mask_credentials(uri)}: cannot start a run there ({type(e).__name__}: "
                            f"{mask_credentials(str(e).splitlines()[0]) if str(e) else ''})") from None


def _start(client, uri: str, cfg, fingerprint_id: str, dataset: dict) -> dict:
    try:
        saved = storage.read_json(storage.join(cfg.out, RUN_FILE))
    except FileNotFoundError:
        saved = {}
    shown = mask_credentials(uri)  # what is written and logged: the credentials stay in memory
    # the same server: recorded masked (a file written before masking holds the URI itself)
    if saved.get("uri") in (shown, uri) and saved.get("run_id"):
        try:
            client.get_run(saved["run_id"])
            client.update_run(saved["run_id"], status="RUNNING")
            if saved["uri"] != shown:
                storage.write_json(storage.join(cfg.out, RUN_FILE), {**saved, "uri": shown})
            return {"uri": uri, "run_id": saved["run_id"]}
        except Exception:  # noqa: BLE001 - deleted there, or another server: a new run
            log.info("MLflow run %s not found at %s; starting a new one", saved["run_id"], shown)
    name = f"xray-dist/{storage.name(cfg.out)}"
    exp = client.get_experiment_by_name("xray-dist")
    exp_id = exp.experiment_id if exp else client.create_experiment("xray-dist")
    run = client.create_run(exp_id, run_name=storage.name(cfg.out), tags={"xray_dist.kind": "train"})
    from mlflow.entities import Param  # MLflow: optional

    params = {**params_of(cfg), "cache_fingerprint": fingerprint_id,
              **{f"images_{k}": str(v.get("images")) for k, v in dataset.get("splits", {}).items()}}
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in sorted(params.items())])
    storage.write_json(storage.join(cfg.out, RUN_FILE), {"uri": shown, "run_id": run.info.run_id, "name": name})
    log.info("MLflow: logging to run %s at %s", run.info.run_id, shown)
    return {"uri": uri, "run_id": run.info.run_id}


def metric_key(key: str) -> str:
    """A metric name MLflow accepts (``val_auc_<class>`` of a class named ``a|b``, say)."""
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", key)


class EpochLogger:
    """Rank 0's per-epoch metrics to the run's MLflow run (failures are logged, never fatal)."""

    def __init__(self, target: dict | None):
        self.target = target
        self.client = _client(target["uri"]) if target else None

    def log(self, row: dict) -> None:
        if not self.client:
            return
        from mlflow.entities import Metric  # MLflow: optional

        now = int(time.time() * 1000)
        step = int(row["epoch"])
        metrics = [Metric(metric_key(k), float(v), now, step) for k, v in row.items()
                   if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        try:
            self.client.log_batch(self.target["run_id"], metrics=metrics)
        except Exception as e:  # noqa: BLE001 - tracking is a convenience; training goes on without it
            log.warning("MLflow: epoch %d not logged (%s: %s)", step, type(e).__name__, mask_credentials(str(e)))


def finish_train_run(target: dict | None, run_dir: Path, complete: bool) -> None:
    """The run's artifacts (no file names in any), and its end."""
    if not target:
        return
    client = _client(target["uri"])
    rid = target["run_id"]
    try:
        for name in (runs.HISTORY, runs.CURVES_PNG, runs.ROC_PNG):
            if Path(runs.path(run_dir, name)).is_file():
                client.log_artifact(rid, runs.path(run_dir, name))
        with tempfile.TemporaryDirectory() as tmp:
            _log_shareable(client, rid, run_dir, Path(tmp))
        client.set_terminated(rid, status="FINISHED" if complete else "KILLED")
    except Exception as e:  # noqa: BLE001
        log.warning("MLflow: artifacts of run %s not logged (%s: %s)", rid, type(e).__name__, mask_credentials(str(e)))


def _log_shareable(client, rid: str, run_dir: Path, tmp: Path) -> None:
    """``metrics.json``, the model's spec and the report, without a location or a file name."""
    metrics = runs.read_metrics(run_dir)
    config = metrics.get("config", {})
    # the run's settings without its locations (cache, run directory, weights file, Ray address)
    metrics["config"] = {k: v for k, v in config.items() if k in PARAMS}
    metrics["config"]["weights"] = weights_kind(str(config.get("weights", "none")))
    storage.write_json(tmp / runs.METRICS, metrics, indent=2)
    client.log_artifact(rid, str(tmp / runs.METRICS))
    spec = read_spec(run_model_dir(run_dir))
    spec.get("top", {}).pop("weights", None)  # a path, when the base came from a file
    storage.write_json(tmp / SPEC_FILE, spec, indent=2)
    client.log_artifact(rid, str(tmp / SPEC_FILE), "model")
    write_report(run_dir, tmp / "report.html", n_boot=200, shareable=True)
    client.log_artifact(rid, str(tmp / "report.html"))


def fail_train_run(target: dict | None) -> None:
    if target:
        try:
            _client(target["uri"]).set_terminated(target["run_id"], status="FAILED")
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow: run %s not marked failed (%s)", target["run_id"], mask_credentials(str(e)))


def sweep_callback(flag: str | None, sweep_out: str):
    """Ray Tune's MLflow callback: each trial a run of the experiment named after the sweep
    (its config: the searched values; its metrics: every epoch's report); None without a URI."""
    uri = tracking_uri(flag)
    if not uri:
        return None
    _client(uri)  # the client is installed (a clear error otherwise)
    _KNOWN[mask_credentials(uri)] = uri
    return _sweep_callback_class()(tracking_uri=uri, experiment_name=f"xray-dist-sweep-{storage.name(sweep_out)}",
                                   tags={"xray_dist.kind": "sweep-trial"}, save_artifact=False)


#: Credential-bearing URIs this process was given, by their masked form (a restored sweep's
#: callback holds only the masked one).
_KNOWN: dict[str, str] = {}


def unmasked(shown: str | None) -> str | None:
    """The URI behind ``shown``: itself when it holds no masked credentials; else the one this
    process was given (``--mlflow``, ``MLFLOW_TRACKING_URI``) that masks to it; else None."""
    if not shown or MASK not in shown:
        return shown
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and mask_credentials(env) == shown:
        return env
    return _KNOWN.get(shown)


def __getattr__(name: str):
    """``SweepMLflowCallback`` is made on first use (Ray is imported only then), and found here
    by name when ``tuner.pkl`` is read back."""
    if name == "SweepMLflowCallback":
        return _sweep_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _sweep_callback_class():
    """Ray Tune's ``MLflowLoggerCallback``, pickled (into the sweep's ``tuner.pkl``) with its URI
    masked; a restored sweep gets the URI back from :func:`unmasked` when it starts."""
    if "SweepMLflowCallback" in globals():
        return globals()["SweepMLflowCallback"]
    from ray.air.integrations.mlflow import MLflowLoggerCallback  # Ray: only for a tracked sweep

    class SweepMLflowCallback(MLflowLoggerCallback):
        def __getstate__(self):
            state = self.__dict__.copy()
            state["tracking_uri"] = mask_credentials(state.get("tracking_uri"))
            return state

        def setup(self, *args, **kwargs):
            real = unmasked(self.tracking_uri)
            if real is None:
                raise XrayDistError(f"--mlflow {self.tracking_uri}: give the URI with its credentials again "
                                    "(--mlflow or MLFLOW_TRACKING_URI) to resume this sweep's tracking")
            self.tracking_uri = real
            return super().setup(*args, **kwargs)

    SweepMLflowCallback.__module__, SweepMLflowCallback.__qualname__ = __name__, "SweepMLflowCallback"
    globals()["SweepMLflowCallback"] = SweepMLflowCallback
    return SweepMLflowCallback
