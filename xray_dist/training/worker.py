"""The training loop, one per worker: ``xray-dist train`` and every sweep trial run :func:`train_loop`.

A worker seeds Keras, picks its devices and strategy (:func:`~xray_dist.training.pipeline.configure_devices`),
builds and compiles the model in the strategy's scope, restores the latest checkpoint (weights,
optimizer and dropout state: :mod:`xray_dist.training.state`) when there is one, and fits on its
:class:`~xray_dist.training.pipeline.ShardCache` with the epoch callbacks of
:mod:`xray_dist.training.callbacks`. Whoever runs the loop gives it a session: Ray Train on a
worker (:class:`RayTrainSession`, through :func:`train_func`, Ray Train's
``train_loop_per_worker``), or the calling process
(:class:`xray_dist.training.inprocess.InProcessSession`).

TensorFlow and Ray are imported inside the functions: Ray Train's controller unpickles
:func:`train_func` by reference to this module, and must not pay for a TensorFlow import.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from xray_dist.config import PRECISIONS, TrainConfig
from xray_dist.data.classes import ClassScheme
from xray_dist.infra import compat, storage
from xray_dist.infra.worker_output import worker_logging
from xray_dist.model.artifacts import load_weights_checked
from xray_dist.training.callbacks import WorkerContext, epoch_reporter, weights_in_sync
from xray_dist.training.features import read_meta
from xray_dist.training.pipeline import BatchOrder, ShardCache, StepPlan, configure_devices, train_input
from xray_dist.training.state import restore_training_state

log = logging.getLogger(__name__)


class RayTrainSession:
    """What :func:`train_loop` needs from whoever runs it — rank and world size, dataset shards,
    the checkpoint to resume from, a way to report an epoch — as Ray Train gives it on a worker.
    :class:`xray_dist.training.inprocess.InProcessSession` gives the same in the calling process."""

    def rank_world(self) -> tuple[int, int]:
        import ray.train  # Ray: on a Train worker only

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()

    def dataset_shard(self, name: str):
        import ray.train  # Ray: on a Train worker only

        return ray.train.get_dataset_shard(name)

    def get_checkpoint(self):
        import ray.train  # Ray: on a Train worker only

        return ray.train.get_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        import ray.train  # Ray: on a Train worker only

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def should_stop(self) -> bool:
        return False  # Ray Train stops its workers itself

    def broadcast_from_rank_zero(self, data):
        """Rank 0's ``data`` (small, picklable) on every rank; a barrier."""
        from ray.train.collective import broadcast_from_rank_zero  # Ray: on a Train worker only

        return broadcast_from_rank_zero(data)


def masked_weighted_bce(pos_weight: list[float]):
    """The multi-label loss: per finding binary cross-entropy, a present finding weighted by its
    positive weight (:func:`xray_dist.data.classes.positive_weights`), uncertain entries (target -1)
    left out; per image the mean over its known findings. ``y_true`` is the K + 1 target row (the
    last column, "any finding", is for metrics only)."""
    import tensorflow as tf  # TensorFlow: workers only

    pw = tf.constant(pos_weight, tf.float32)
    k = len(pos_weight)

    def loss(y_true, y_pred):
        y = tf.cast(y_true, tf.float32)[:, :k]
        p = tf.clip_by_value(tf.cast(y_pred, tf.float32), 1e-7, 1.0 - 1e-7)
        known = tf.cast(y >= 0.0, tf.float32)
        pos = tf.maximum(y, 0.0)
        per = -(pw * pos * tf.math.log(p) + (1.0 - pos) * tf.math.log(1.0 - p)) * known
        return tf.reduce_sum(per, axis=-1) / tf.maximum(tf.reduce_sum(known, axis=-1), 1.0)

    return loss


def _devices(strategy) -> list[str]:
    try:
        return list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy: one device
        import tensorflow as tf  # TensorFlow: workers only

        return [d.name for d in tf.config.list_logical_devices("GPU")[:1] or tf.config.list_logical_devices("CPU")[:1]]


def _record_worker(ctx: WorkerContext, times: dict, resumed_after_epoch: int = 0) -> dict:
    """``RUN/workers/rank<N>.json``: where each worker ran and on what (visible when RUN is shared
    storage), its process, and the epoch it started after (0, or a checkpoint's: a replaced
    worker, or a rerun, rewrites the file). Returns the record; the weights check
    (:mod:`xray_dist.training.callbacks`) adds the digest of the weights after each epoch
    (``weights_digest``: equal on every rank)."""
    import ray  # Ray: the node this worker runs on

    info = {"rank": ctx.rank, "world_size": ctx.world, "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(), "pid": os.getpid(), "resumed_after_epoch": resumed_after_epoch,
            "strategy": type(ctx.strategy).__name__,
            "replicas": ctx.replicas, "devices": _devices(ctx.strategy),
            "precision": ctx.policy.removeprefix("mixed_"), "precision_why": ctx.precision_why, "times": times}
    storage.write_json(ctx.record_path(), info, indent=2)
    return info


def train_func(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: :func:`train_loop` on a Train worker."""
    train_loop(config, RayTrainSession())


def _start(config: dict, session) -> WorkerContext:
    """Seeds, devices and strategy for this worker; its context."""
    import tf_keras as keras  # TensorFlow: workers only

    cfg: TrainConfig = config["cfg"]
    rank, world = session.rank_world()
    keras.utils.set_random_seed(cfg.seed)
    strategy, chosen = configure_devices(cfg, world)
    ctx = WorkerContext(cfg, ClassScheme.from_dict(config["scheme"]), session, rank, world, strategy, chosen.policy,
                        chosen.why)
    if rank == 0:
        log.info("strategy %s: %d replicas (%d workers), global batch %d, precision %s (%s)",
                 type(strategy).__name__, ctx.replicas, world, cfg.batch_size * ctx.replicas, chosen.name, chosen.why)
    return ctx


def _compiled_model(ctx: WorkerContext, config: dict):
    """The model (full, or the top on frozen features), compiled in the strategy's scope, and its
    input's ``tf.TensorSpec``."""
    import tensorflow as tf  # TensorFlow: workers only
    import tf_keras as keras

    from xray_dist.model.network import ModelSpec, build_model, build_top_model  # imports TensorFlow

    cfg, spec = ctx.cfg, ModelSpec.from_dict(config["model_spec"])
    with ctx.strategy.scope():
        if cfg.features:
            shape = tuple(read_meta(cfg.features)["shape"])
            model = build_top_model(spec, shape, cfg.weights, cfg.seed)
            input_spec = tf.TensorSpec((None, *shape), tf.float32)
        else:
            model = build_model(spec, cfg.weights, cfg.seed)
            input_spec = tf.TensorSpec((None, spec.image_size, spec.image_size), tf.uint8)
        if ctx.scheme.multilabel:
            loss = masked_weighted_bce(config["pos_weight"])
        else:
            loss = "binary_crossentropy" if ctx.scheme.binary else "sparse_categorical_crossentropy"
        model.compile(optimizer=keras.optimizers.Adam(cfg.lr), loss=loss)
    return model, input_spec


def _resume(ctx: WorkerContext, model, whole: bool) -> tuple[list[dict], int]:
    """The history and epoch of the checkpoint to resume from, its weights and training state
    loaded into ``model``; ``([], 0)`` without one."""
    ckpt = ctx.session.get_checkpoint()
    if not ckpt:
        return [], 0
    with ckpt.as_directory() as d:
        load_weights_checked(model, Path(d) / "weights.h5")
        exact = restore_training_state(model, Path(d), ctx.strategy)
        state = storage.read_json(Path(d) / "state.json")
    was, now = state.get("precision"), ctx.policy.removeprefix("mixed_")
    if ctx.rank == 0 and was and was != now:  # weights are float32 whatever ran: they carry over, exactness not
        log.warning("resuming a run that computed in %s, now in %s (--precision %s): its weights carry over, but the "
                    "epochs from here are not the ones it would have trained; %s resumes it exactly", was, now,
                    ctx.cfg.precision, f"--precision {was}" if was in PRECISIONS else "the machine it started on")
    if ctx.rank == 0:
        how = (f"computed in {now} where the run computed in {was}: not the uninterrupted run" if was and was != now
               else "exactly: optimizer, dropout and data order as the uninterrupted run" if exact and whole else
               "optimizer and dropout state restored; the data order is Ray Data's (the training split is larger "
               "than worker_cache_mb)" if exact else "weights only: the checkpoint holds no optimizer state")
        log.info("resuming from the checkpoint after epoch %d (%s)", state["epoch"], how)
    return state["history"], state["epoch"]


def train_loop(config: dict, session) -> None:
    """The training loop, one per worker; ``xray-dist train`` and every sweep trial run this."""
    from xray_dist.model.network import trainable_parameters  # imports TensorFlow

    # this worker's lines reach the driver's terminal (a sweep trial's: the log; Tune's lines say
    # how each trial did); TensorFlow's go to the log
    worker_logging(terminal=config.get("terminal", True))
    t_entry = time.time()
    ctx = _start(config, session)
    cfg = ctx.cfg
    model, input_spec = _compiled_model(ctx, config)
    params = trainable_parameters(model)
    t_model = time.time()
    compat.dropout_generators(model)  # dropout's generators exist before a checkpoint is restored into them
    whole = bool(config.get("whole_split"))
    history, start = _resume(ctx, model, whole)
    record = _record_worker(ctx, {"train_func_entry": t_entry, "model_ready": t_model}, resumed_after_epoch=start)

    plan = StepPlan.make(config["n_train"], ctx.world, ctx.replicas, cfg.batch_size)
    rows = ShardCache(session.dataset_shard("train"), BatchOrder.for_worker(cfg, plan, ctx.rank, ctx.world, whole),
                      start_epoch=start)
    if ctx.rank == 0:
        log.info("input: %s", "global-batch order (split held in memory; the same batches for any cluster shape)"
                 if whole else "Ray Data shard order (streamed: the training split is larger than worker_cache_mb; "
                 "the batches depend on the cluster's shape)")
    label_shape = (ctx.scheme.num_classes + 1,) if ctx.scheme.multilabel else ()
    batches = train_input(ctx.strategy, rows, input_spec, label_shape)
    if start >= cfg.epochs:
        # the run had trained every epoch when its process ended (a sweep trial killed between its
        # last checkpoint and its export, say): report the last epoch again, so whoever waits for
        # this run's reports — Tune, with its metric — sees it finish instead of an empty result
        if history:
            session.report(dict(history[-1]), None)
        return
    reporter = epoch_reporter(ctx, plan, history, params, config.get("mlflow"))
    in_sync = weights_in_sync(ctx, record)  # before the reporter: no checkpoint if not
    model.fit(batches, epochs=cfg.epochs, initial_epoch=start, steps_per_epoch=plan.steps, verbose=0,
              callbacks=[in_sync, reporter])
