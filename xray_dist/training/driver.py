"""``xray-dist train``: the Ray Train driver (:func:`train`) around the per-worker loop.

Distribution. Between Ray Train workers ``MultiWorkerMirroredStrategy``: Ray Train's
``DataParallelTrainer`` with :mod:`xray_dist.training.backend` setting ``TF_CONFIG``; each worker
runs :func:`xray_dist.training.worker.train_func` on its input
(:mod:`xray_dist.training.pipeline`). After each epoch every rank checks that its weights hash as
rank 0's do, rank 0 validates and checkpoints, and every worker calls ``ray.train.report``
(:mod:`xray_dist.training.callbacks`). ``CheckpointConfig`` keeps the best few by ``cfg.metric``;
``FailureConfig`` restarts workers from the latest checkpoint, and running again with the same
``--out`` resumes (Train V2 restores the run from its storage path) — with the same settings only
(:mod:`xray_dist.training.resume`) and on the same cache (its fingerprint). The run ends with its
export (:mod:`xray_dist.training.export`) and, with ``--mlflow``, its MLflow run marked finished —
or failed, when the workers failed for good.

:func:`make_trainer` is shared with the sweep (:mod:`xray_dist.training.tune`); what a run trains
is set up in :mod:`xray_dist.training.inputs` for both and for in-process runs
(:mod:`xray_dist.training.inprocess`: ``--runner inprocess``, and one-worker sweep trials).
Ray and TensorFlow are imported inside the functions that need them: the CLI imports this module.
"""

from __future__ import annotations

import time
from pathlib import Path

from xray_dist.config import TrainConfig
from xray_dist.data import fingerprint
from xray_dist.data.cache import read_report_summary
from xray_dist.errors import ModelSpecError
from xray_dist.infra import storage
from xray_dist.infra.locks import TargetLock
from xray_dist.infra.runtime import init_ray, worker_env
from xray_dist.model.artifacts import MODEL_DIR
from xray_dist.results import tracking
from xray_dist.results.runs import METRICS
from xray_dist.training.export import TrainResult, export_run, write_metrics
from xray_dist.training.inprocess import train_in_process
from xray_dist.training.inputs import run_inputs
from xray_dist.training.resume import changed_settings, check_same_settings
from xray_dist.training.scalars import TENSORBOARD_DIR
from xray_dist.training.worker import train_func

RAY_DIR = "ray"
RUN_NAME = "train"
RUN_CONFIG = "config.json"
#: Settings a resumed run must keep: they shape its model, its data and its optimisation.
RUN_SETTINGS = ("cache", "batch_size", "lr", "head_width", "dropout", "num_classes", "negative_class", "task",
                "unfreeze_blocks", "weights", "seed", "features", "augment", "runner")


def _check_resume_compatible(cfg: TrainConfig, out: str) -> None:
    def differences(old: dict) -> list[str]:
        # a setting the run's config.json predates had its default then
        was = {k: old.get(k, TrainConfig.__dataclass_fields__[k].default) for k in RUN_SETTINGS}
        return changed_settings(was, {k: getattr(cfg, k) for k in RUN_SETTINGS}, RUN_SETTINGS)

    check_same_settings(out, RUN_CONFIG, "run", differences)


def make_trainer(cfg: TrainConfig, callbacks: list | None = None, storage_path: str | None = None,
                 terminal: bool = True, mlflow: dict | None = None):
    """The Ray Train trainer for ``cfg`` (the sweep builds its trials' trainers here too): a
    ``DataParallelTrainer`` with the MultiWorkerMirroredStrategy backend — what
    ``TensorflowTrainer`` is, minus a TensorFlow import in the driver and controller
    (:mod:`xray_dist.training.backend`)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig  # Ray: heavy
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from xray_dist.training.backend import MultiWorkerConfig  # imports Ray

    scheme, spec, datasets, loop_config = run_inputs(cfg, terminal)
    loop_config["mlflow"] = mlflow  # rank 0 logs each epoch to this MLflow run (xray_dist.results.tracking)
    # Checkpoints go where the run's --out is: a local directory, or an object store every node
    # reaches (Ray Train uploads each worker's checkpoint there and downloads it on a restart).
    ray_path, ray_fs = storage.ray_storage(storage_path or storage.join(cfg.out, RAY_DIR))
    resources = {"CPU": cfg.worker_cpus}
    if cfg.gpus_per_worker:
        resources["GPU"] = cfg.gpus_per_worker
    trainer = DataParallelTrainer(
        train_loop_per_worker=train_func,
        backend_config=MultiWorkerConfig(),
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=bool(cfg.gpus_per_worker),
                                     resources_per_worker=resources, placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(
            name=RUN_NAME, storage_path=ray_path, storage_filesystem=ray_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                               checkpoint_score_attribute=cfg.metric,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks or [],
            worker_runtime_env={"env_vars": worker_env()},  # the job's own set: its process pool
        ),
        datasets=datasets,
        # a split that fits goes whole to every worker (a fixed order per epoch, see ShardCache)
        dataset_config=DataConfig(datasets_to_split=[] if loop_config["whole_split"] else ["train"]),
    )
    return trainer, scheme, spec


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) training as described by ``cfg``; write everything into ``cfg.out``."""
    cfg = cfg.resolved()
    for where in (cfg.out, cfg.cache, *([cfg.weights] if cfg.weights not in ("imagenet", "none") else [])):
        storage.check_location(where)
    if cfg.weights not in ("imagenet", "none") and not storage.is_file(cfg.weights):
        raise ModelSpecError(f"--weights {cfg.weights}: no such file")
    with TargetLock(cfg.out, "xray-dist train"):  # one writer per run directory
        return _train_locked(cfg)


def _train_locked(cfg: TrainConfig) -> TrainResult:
    _check_resume_compatible(cfg, cfg.out)
    fp = fingerprint.check_unchanged(cfg.out, cfg.cache, "run")  # a re-split cache must not be resumed on
    storage.makedirs(cfg.out)
    storage.write_json(storage.join(cfg.out, RUN_CONFIG), cfg.to_dict(), indent=2)
    fingerprint.record(cfg.out, cfg.cache, fp)
    init_ray(cfg.address)
    target = tracking.start_train_run(cfg, fp["id"], read_report_summary(cfg.cache))
    t0 = time.time()
    try:
        if cfg.runner == "inprocess":  # the same loop here: checkpoints in RUN/checkpoints, no worker recovery
            result, scheme, spec = train_in_process(cfg, mlflow=target, terminal=True)
        else:
            trainer, scheme, spec = make_trainer(cfg, mlflow=target)
            result = trainer.fit()  # Train V2 raises when the workers fail past --max-failures
    except Exception:
        tracking.fail_train_run(target)
        raise
    # exports are written locally, then (object storage) uploaded: the model and TensorBoard
    # directories are replaced whole, so a resumed run leaves no stale file behind
    with storage.staged_output(cfg.out, replace=(MODEL_DIR, TENSORBOARD_DIR), marker=METRICS) as local_out:
        res = export_run(cfg, result, scheme, spec, local_out)
        res.metrics["wall_seconds"] = round(time.time() - t0, 1)
        res.metrics["cache_fingerprint"] = fp["id"]
        write_metrics(local_out, res.metrics)
        tracking.finish_train_run(target, local_out, res.metrics["complete"])
    res.out = cfg.out if storage.is_uri(cfg.out) else Path(cfg.out)
    return res
