"""Training: one per-worker function (:func:`train_func`) and its Ray Train driver (:func:`train`).

Distribution. Between Ray Train workers: ``MultiWorkerMirroredStrategy`` (Ray Train's
``DataParallelTrainer`` with :mod:`xray_dist.training.backend` setting ``TF_CONFIG``); MWMS also mirrors across all GPUs inside each worker. One worker with several
devices uses ``MirroredStrategy``; one worker with one device runs without collectives. Each
worker's input is a ``tf.data`` pipeline made with ``distribute_datasets_from_function`` whose
elements are per-replica batches, so the global batch is ``batch_size × replicas``.

Data. Ray Data reads the Parquet cache. A training split that fits in ``worker_cache_mb`` goes
whole to every worker, and global step ``s`` trains the ``s``-th global batch of the epoch's
seeded permutation, each replica its slice (:class:`ShardCache`): the same batches for any
spread of the replicas over workers and devices. A bigger split: ``DataConfig`` gives each worker
an equal shard (equal rows → equal batches → no MWMS hang on the last batch), kept in the worker's
memory after the first epoch when it fits, reshuffled every epoch and prefetched; its batches
depend on the number of workers. After each epoch every rank checks that its weights hash as
rank 0's do (:func:`weights_digest`). Class imbalance: balanced per-sample weights
``n / (K · n_k)`` from the training split, carried as a column.

Validation. Rank 0 scores the whole validation split each epoch with direct model calls (no
collectives), computes the metrics of :mod:`xray_dist.results.metrics`, and every worker calls
``ray.train.report``; rank 0 attaches the checkpoint (weights, epoch history, validation scores).
``CheckpointConfig`` keeps the best few by ``cfg.metric``; ``FailureConfig`` restarts workers from
the latest checkpoint, and running again with the same ``--out`` resumes (Train V2 restores the run
from its storage path). Each epoch is recorded once: the history travels inside the checkpoint.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray_dist.data.classes import ClassScheme, build_scheme
from xray_dist.config import TrainConfig
from xray_dist.infra import compat
from xray_dist.data.cache import manifest_labels, split_labels
from xray_dist.data import fingerprint
from xray_dist.infra import storage
from xray_dist.errors import CacheError, ModelSpecError, RunStopped, XrayDistError

log = logging.getLogger(__name__)

RAY_DIR = "ray"
RUN_NAME = "train"
DATA_CPUS = 0.25
MODEL_DIR = "model"
SCALAR_KEYS = ("val_loss", "val_accuracy", "val_auc", "val_auc_abnormal", "threshold", "sensitivity",
               "specificity", "loss", "images_per_s", "epoch_seconds")


# ---- data ------------------------------------------------------------------------------------------

def attach_labels(batch: dict, label_of: dict, weight_of: dict, column: str = "image") -> dict:
    """Keep the rows of one split (by path): ``path``, ``x`` (the model input), ``label`` (class
    index, or a multi-label target row: :meth:`ClassScheme.target`), ``weight`` (the class's
    balancing weight; 1 for multi-label rows, whose loss weighs positives per finding)."""
    keep = np.array([p in label_of for p in batch["path"]], dtype=bool)
    paths = np.asarray(batch["path"])[keep]
    targets = [label_of[p] for p in paths]
    if targets and np.ndim(targets[0]):
        labels = np.stack(targets).astype(np.int32)
        weights = np.ones(len(labels), dtype=np.float32)
    else:
        labels = np.array(targets, dtype=np.int32)
        weights = np.array([weight_of[int(c)] for c in labels], dtype=np.float32)
    return {"path": paths, "x": np.asarray(batch[column])[keep], "label": labels, "weight": weights}


def split_source(cache: str | Path, features: str | None) -> tuple[str, str]:
    """The Parquet directory (local path or URI) a run reads and its model-input column: images, or
    frozen features."""
    from xray_dist.data.cache import IMAGES_DIR

    return (storage.join(features, "shards"), "x") if features else (storage.join(cache, IMAGES_DIR), "image")


def split_dataset(cache: str | Path, split: str, scheme: ClassScheme, class_weight: dict[int, float],
                  features: str | None = None):
    """A Ray Dataset of one split: ``x`` (S×S uint8 image, or frozen features), ``label``, ``weight``."""

    from xray_dist.data.cache import read_cache_parquet

    label_of = split_labels(cache, split, scheme)
    source, column = split_source(cache, features)
    # Fractional CPUs: the Train workers hold most of a small node's CPU, and a data task that waits
    # for a whole free CPU would stall ingestion for good.
    ds = read_cache_parquet(source, ["path", column], DATA_CPUS)
    ds = ds.map_batches(attach_labels, fn_kwargs={"label_of": label_of, "weight_of": class_weight, "column": column},
                        batch_format="numpy", batch_size=256, num_cpus=DATA_CPUS)
    # Progress is the per-epoch log line and Tune's table; Ray Data's own bars, drawn by every
    # worker on every pass, flooded non-TTY logs (ray job logs, CI) with carriage-return redraws.
    ds.context.enable_progress_bars = False
    return ds, len(label_of)


def balanced_weights(counts: dict[int, int]) -> dict[int, float]:
    n, k = sum(counts.values()), len(counts)
    return {c: n / (k * max(v, 1)) for c, v in counts.items()}


def row_bytes(cfg: TrainConfig, spec: dict) -> int:
    """Memory one model input takes: an S×S uint8 image, or float32 frozen features."""
    if cfg.features:
        from xray_dist.training.features import read_meta

        return 4 * int(np.prod(read_meta(cfg.features)["shape"]))
    return int(spec["image_size"]) ** 2


def fits_in_worker(cfg: TrainConfig, spec: dict, rows: int) -> bool:
    """Whether ``rows`` model inputs fit in one worker's ``worker_cache_mb``."""
    return rows * row_bytes(cfg, spec) <= cfg.worker_cache_mb * 2**20


# ---- per-worker training ---------------------------------------------------------------------------

def _configure_devices(cfg: TrainConfig, world: int):
    """Logical CPU devices (``cpu_replicas``), mixed precision; returns (strategy, precision policy name)."""
    import tensorflow as tf
    import tf_keras as keras

    if cfg.cpu_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cfg.cpu_replicas)
    gpus = tf.config.list_physical_devices("GPU")
    for g in gpus:
        try:
            tf.config.experimental.set_memory_growth(g, True)
        except RuntimeError:  # already initialised: a reused sweep-trial process set it for its first trial
            pass
    policy = "float32"
    if gpus and cfg.mixed_precision != "off":
        major = int(tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (7, 0))[0])
        policy = "mixed_bfloat16" if major >= 8 else "mixed_float16"
    elif cfg.mixed_precision == "on":
        policy = "mixed_bfloat16"
    keras.mixed_precision.set_global_policy(policy)
    if world > 1:
        comm = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.NCCL if gpus
            else tf.distribute.experimental.CommunicationImplementation.RING)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=comm)
    else:
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or \
                  [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices) if len(devices) > 1 else tf.distribute.get_strategy()
    return strategy, policy


@dataclass(frozen=True)
class StepPlan:
    """Equal steps on every worker: MWMS hangs if one worker runs out of batches before the others.

    ``steps = ⌊⌊n / world⌋ / (b·k)⌋ = ⌊n / G⌋`` (``G = b·k·world``, the global batch): the same
    whether the split is streamed in equal shares or held whole, and for every way of spreading
    the same replicas; the rows past the last full global batch are left out of that epoch (not
    padded). ``b`` is ``batch_size`` unless the split is smaller than one global batch.
    """

    per_replica_batch: int
    local_replicas: int
    steps: int

    @classmethod
    def make(cls, n_train: int, world: int, replicas: int, batch_size: int) -> "StepPlan":
        rows = n_train // world  # DataConfig's equal split gives every worker this many rows
        local = max(replicas // world, 1)
        per_replica = max(1, min(batch_size, rows // local))
        steps = rows // (per_replica * local)
        if steps < 1:
            raise XrayDistError(f"{n_train} training images cannot feed {replicas} replicas; use fewer workers")
        return cls(per_replica, local, steps)


class ShardCache:
    """This worker's training batches, one pass per epoch, in an order set by (seed, epoch) alone
    where the rows allow it.

    *Whole split* (``whole``: the driver found that the training split fits in ``worker_cache_mb``,
    and gave every worker all of it): the rows are read once, sorted by path, and each epoch draws
    one seeded permutation of the whole split, the same on every worker. Global step ``s`` trains
    on rows ``[s·G, (s+1)·G)`` of it, ``G = batch_size × local_replicas × world`` the global batch;
    replica ``j`` of rank ``r`` (replica ``r·k + j`` counted over all workers, ``k`` local replicas)
    takes the ``(r·k + j)``-th ``batch_size`` rows of that global batch. A worker's batches come
    out step by step, its ``k`` replicas' in turn, which is the order
    ``distribute_datasets_from_function`` deals them to the local replicas (round robin). So every
    step trains the same global batch however the replicas are spread over workers and devices:
    2 workers × batch 8, 1 worker × 2 devices × batch 8 and 1 device × batch 16 train the same
    model (up to floating-point summation order; dropout aside: each replica draws its own mask).
    The ``n − steps·G`` rows past the last full global batch sit out that epoch (a different set
    every epoch). The epoch-``e`` batches are the same in every run with that seed, whatever order
    Ray Data delivered the rows in — which is what lets a resumed run replay the epochs the
    uninterrupted run trains (with the optimizer and dropout state of the checkpoint) — and the
    shuffle spans the whole split rather than a local buffer.

    *Split shard* (bigger datasets: Ray Data's equal share of the split for this worker): the first
    pass streams (with Ray Data's local shuffle buffer); the rows are kept in memory when they fit in
    ``limit_bytes`` — all of them, the rows of the first pass's partial last batch included, so no
    row is left out of training for good — and later epochs permute them, sorted by path, with a
    seeded permutation. Which rows a worker's share holds is Ray Data's choice, so a resumed run's
    order is not the uninterrupted run's, and the batches depend on the number of workers. A share
    larger than ``limit_bytes`` streams every epoch.

    Either way a pass yields exactly ``per_pass`` full batches (equal steps on every worker).
    """

    def __init__(self, shard, batch_size: int, per_pass: int, shuffle_buffer: int, seed: int, limit_bytes: int,
                 whole: bool = False, rank: int = 0, world: int = 1, start_epoch: int = 0, local_replicas: int = 1):
        self.shard, self.batch_size, self.per_pass = shard, batch_size, per_pass
        self.shuffle_buffer, self.seed, self.limit = shuffle_buffer, seed, limit_bytes
        self.whole, self.rank, self.world, self.local = whole, rank, world, local_replicas
        self.rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.epoch = start_epoch  # the epoch the last pass trained (a resumed run starts after its checkpoint)

    def _stream(self, shuffle: bool = True):
        local = shuffle and self.shuffle_buffer
        it = self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy", prefetch_batches=2,
                                     drop_last=False, local_shuffle_buffer_size=self.shuffle_buffer if local else None,
                                     local_shuffle_seed=self.seed * 1000 + self.epoch if local else None)
        return ((b["path"], b["x"], b["label"].astype(np.float32), b["weight"]) for b in it)

    def _keep(self, parts: list) -> None:
        paths, x, y, w = (np.concatenate(p) for p in zip(*parts))
        order = np.argsort(paths, kind="stable")  # a fixed order, whatever order the rows came in
        self.rows = (x[order], y[order], w[order])

    def _permutation(self, n: int) -> np.ndarray:
        return np.random.default_rng(self.seed * 1000 + self.epoch).permutation(n)

    def batches(self):
        """One pass: exactly ``per_pass`` full batches."""
        self.epoch += 1
        if self.whole and self.rows is None:
            self._keep([b for b in self._stream(shuffle=False)])
        if self.rows is not None:
            x, y, w = self.rows
            order = self._permutation(len(x))
            for i in range(self.per_pass):
                start = self._global_batch_start(i) if self.whole else i * self.batch_size
                idx = order[start : start + self.batch_size]
                yield x[idx], y[idx], w[idx]
            return
        keep: list | None = [] if self.limit > 0 else None
        size = yielded = 0
        for p, x, y, w in self._rebatched():
            if keep is not None:
                size += x.nbytes
                if size <= self.limit:
                    keep.append((p, x, y, w))
                else:
                    keep = None  # too big for memory: stream every epoch
            if yielded < self.per_pass and len(x) == self.batch_size:  # full batches only: equal steps everywhere
                yielded += 1
                yield x, y, w
        if keep:
            self._keep(keep)

    def _global_batch_start(self, i: int) -> int:
        """Where this worker's ``i``-th batch of a pass starts in the epoch's permutation (whole split):
        step ``i // k``'s global batch, the slot of local replica ``i % k``."""
        step, j = divmod(i, self.local)
        return (step * self.world * self.local + self.rank * self.local + j) * self.batch_size

    def _rebatched(self):
        """The stream in full batches, then the remainder. Ray Data can hand over a short batch in
        the middle of a streamed share (seen: 4, 4, 1, 4 for 13 rows in batches of 4), which would
        leave this worker a batch short of the others; rows are carried over instead."""
        parts: list = []
        n = 0
        for part in self._stream():
            parts.append(part)
            n += len(part[1])
            if n < self.batch_size:
                continue
            rows = [np.concatenate(c) for c in zip(*parts)]
            full = n - n % self.batch_size
            for i in range(0, full, self.batch_size):
                yield tuple(a[i : i + self.batch_size] for a in rows)
            parts = [tuple(a[full:] for a in rows)] if full < n else []
            n -= full
        if n:
            yield tuple(np.concatenate(c) for c in zip(*parts))


def _train_input(strategy, cache: ShardCache, input_spec, label_shape: tuple = ()):
    """An endless tf.data input over this worker's :class:`ShardCache`; elements are per-replica batches.

    Each pass yields exactly ``steps × local replicas`` full batches — the rest of a Ray Data pass
    is drained unused — so Keras epochs and data passes stay aligned on every worker
    (MultiWorkerMirroredStrategy hangs on unequal batch counts).
    """
    import tensorflow as tf

    def gen():
        while True:
            yield from cache.batches()

    sig = (input_spec, tf.TensorSpec((None, *label_shape), tf.float32),
           tf.TensorSpec((None,), tf.float32))

    def dataset_fn(_ctx):
        ds = tf.data.Dataset.from_generator(gen, output_signature=sig).prefetch(tf.data.AUTOTUNE)
        opts = tf.data.Options()
        opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return ds.with_options(opts)

    if strategy.num_replicas_in_sync == 1:
        return dataset_fn(None)
    return strategy.distribute_datasets_from_function(dataset_fn)


OPTIMIZER_STATE = "optimizer.npz"
RNG_STATE = "rng.npz"


def save_training_state(model, directory: Path) -> None:
    """What the next epoch needs beside the weights: Adam's moments and step counter
    (``optimizer.npz``, in the optimizer's variable order) and each dropout generator's state
    (``rng.npz``). Together with the epoch in ``state.json`` and :class:`ShardCache`'s
    (seed, epoch) order, a run resumed from this checkpoint trains what the uninterrupted run would."""
    np.savez(directory / OPTIMIZER_STATE, *[np.asarray(v.numpy()) for v in model.optimizer.variables])
    np.savez(directory / RNG_STATE, **{name: g.state.numpy() for name, g in compat.dropout_generators(model).items()})


def restore_training_state(model, directory: Path, strategy) -> bool:
    """Load :func:`save_training_state`'s files into a compiled model (built in ``strategy``'s
    scope); False when the checkpoint has none (written before xray-dist kept them)."""
    if not (directory / OPTIMIZER_STATE).exists():
        return False
    opt = model.optimizer
    with strategy.scope():
        getattr(opt, "inner_optimizer", opt).build(model.trainable_variables)
    with np.load(directory / OPTIMIZER_STATE) as f:
        values = [f[f"arr_{i}"] for i in range(len(f.files))]
    variables = list(opt.variables)
    if len(values) != len(variables) or any(tuple(v.shape) != a.shape for v, a in zip(variables, values)):
        raise CacheError(f"{directory}: the checkpoint's optimizer state ({len(values)} arrays) does not fit this "
                         f"model's optimizer ({len(variables)} variables); resume with the run's own settings")
    for v, a in zip(variables, values):
        v.assign(a)
    gens = compat.dropout_generators(model)
    with np.load(directory / RNG_STATE) as f:
        for name in f.files:
            if name in gens:
                gens[name].state.assign(f[name])
    return True


def _score(model, batches, scheme: ClassScheme) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities ``(n, K)``, labels and paths for ``(x, label, path)`` batches, with direct model calls."""
    probs, labels, paths = [], [], []
    for x, y, p in batches:
        probs.append(np.asarray(model(x, training=False), dtype=np.float64))
        labels.append(y)
        paths.append(np.asarray(p, dtype=str))
    return scheme.probabilities(np.concatenate(probs)), np.concatenate(labels).astype(int), np.concatenate(paths)


def masked_weighted_bce(pos_weight: list[float]):
    """The multi-label loss: per finding binary cross-entropy, a present finding weighted by its
    positive weight (:func:`xray_dist.data.classes.positive_weights`), uncertain entries (target -1)
    left out; per image the mean over its known findings. ``y_true`` is the K + 1 target row (the
    last column, "any finding", is for metrics only)."""
    import tensorflow as tf

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


class ValidationSet:
    """The validation split for rank 0: read through Ray Data once, then kept in memory when it
    fits in ``limit_bytes`` (re-read every epoch otherwise)."""

    def __init__(self, shard, limit_bytes: int, batch_size: int = 64):
        self.shard, self.limit, self.batch_size = shard, limit_bytes, batch_size
        self.kept: list | None = None

    def batches(self):
        if self.kept is not None:
            return self.kept
        out, size = [], 0
        for b in self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy"):
            out.append((b["x"], b["label"], b["path"]))
            size += b["x"].nbytes
        if size <= self.limit:
            self.kept = out
        return out


def _devices(strategy) -> list[str]:
    try:
        return list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy: one device
        import tensorflow as tf

        return [d.name for d in tf.config.list_logical_devices("GPU")[:1] or tf.config.list_logical_devices("CPU")[:1]]


def _record_worker(cfg: TrainConfig, rank: int, world: int, strategy, policy: str, times: dict,
                   resumed_after_epoch: int = 0) -> dict:
    """``RUN/workers/rank<N>.json``: where each worker ran and on what (visible when RUN is shared
    storage), its process, and the epoch it started after (0, or a checkpoint's: a replaced
    worker, or a rerun, rewrites the file). Returns the record; :class:`WeightsInSync` adds the
    digest of the weights after each epoch (``weights_digest``: equal on every rank)."""
    import os
    import socket

    import ray

    info = {"rank": rank, "world_size": world, "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(), "pid": os.getpid(), "resumed_after_epoch": resumed_after_epoch,
            "strategy": type(strategy).__name__,
            "replicas": strategy.num_replicas_in_sync, "devices": _devices(strategy),
            "precision": policy, "times": times}
    storage.write_json(storage.join(cfg.out, "workers", f"rank{rank}.json"), info, indent=2)
    return info


def weights_digest(model, strategy) -> str:
    """sha256 (hex) of the model's trainable weights, their bytes in the model's order. Every local
    copy of a mirrored variable must hold the same bytes (an :class:`XrayDistError` otherwise)."""
    import hashlib

    h = hashlib.sha256()
    for v in model.trainable_weights:
        # mixed precision wraps each variable (AutoCastVariable); its copies are the wrapped one's
        copies = [np.asarray(c.numpy()) for c in strategy.experimental_local_results(getattr(v, "_variable", v))]
        if any(c.tobytes() != copies[0].tobytes() for c in copies[1:]):
            raise XrayDistError(f"the {len(copies)} local copies of {v.name} differ: the replicas of this worker are "
                                "out of sync")
        h.update(copies[0].tobytes())
    return h.hexdigest()


def _make_sync_check_class():
    import tf_keras as keras

    class WeightsInSync(keras.callbacks.Callback):
        """After each epoch, before validation and the checkpoint: every rank hashes its trainable
        weights (:func:`weights_digest`) into ``RUN/workers/rank<N>.json`` (``weights_digest``:
        epoch and sha256) and compares it with rank 0's; a rank whose weights differ — the
        gradient all-reduce did not keep the workers in step — stops the run with an error that
        names both digests."""

        def __init__(self, cfg, session, strategy, rank, world, record):
            super().__init__()
            self.cfg, self.session, self.strategy, self.rank, self.world = cfg, session, strategy, rank, world
            self.record = record

        def on_epoch_end(self, epoch, logs=None):
            digest = weights_digest(self.model, self.strategy)
            self.record["weights_digest"] = {"epoch": epoch + 1, "sha256": digest}
            storage.write_json(storage.join(self.cfg.out, "workers", f"rank{self.rank}.json"), self.record, indent=2)
            if self.world > 1:
                first = self.session.broadcast_from_rank_zero(digest)
                if first != digest:
                    raise XrayDistError(f"rank {self.rank}: the trainable weights after epoch {epoch + 1} differ from "
                                        f"rank 0's (sha256 {digest[:12]} vs {first[:12]}): the workers' gradients "
                                        "were not all-reduced")

    return WeightsInSync


def _WeightsInSync(*args):  # noqa: N802 - builds the Keras callback lazily (TensorFlow imports in workers only)
    return _make_sync_check_class()(*args)


class RayTrainSession:
    """What :func:`train_loop` needs from whoever runs it — rank and world size, dataset shards,
    the checkpoint to resume from, a way to report an epoch — as Ray Train gives it on a worker.
    :class:`xray_dist.training.inprocess.InProcessSession` gives the same in the calling process."""

    def rank_world(self) -> tuple[int, int]:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()

    def dataset_shard(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def get_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def should_stop(self) -> bool:
        return False  # Ray Train stops its workers itself

    def broadcast_from_rank_zero(self, data):
        """Rank 0's ``data`` (small, picklable) on every rank; a barrier."""
        from ray.train.collective import broadcast_from_rank_zero

        return broadcast_from_rank_zero(data)


def train_func(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: :func:`train_loop` on a Train worker."""
    train_loop(config, RayTrainSession())


def train_loop(config: dict, session) -> None:
    """The training loop, one per worker; ``xray-dist train`` and every sweep trial run this."""
    import tensorflow as tf
    import tf_keras as keras

    from xray_dist.infra.console import worker_logging
    from xray_dist.model.network import ModelSpec, build_model, trainable_parameters
    from xray_dist.model.artifacts import load_weights_checked

    # this worker's lines reach the driver's terminal (a sweep trial's: the log; Tune's lines say
    # how each trial did); TensorFlow's go to the log
    worker_logging(terminal=config.get("terminal", True))
    t_entry = time.time()
    cfg: TrainConfig = config["cfg"]
    scheme = ClassScheme.from_dict(config["scheme"])
    spec = ModelSpec.from_dict(config["model_spec"])
    rank, world = session.rank_world()
    keras.utils.set_random_seed(cfg.seed)
    strategy, policy = _configure_devices(cfg, world)
    replicas = strategy.num_replicas_in_sync
    if rank == 0:
        log.info("strategy %s: %d replicas (%d workers), global batch %d, precision %s",
                 type(strategy).__name__, replicas, world, cfg.batch_size * replicas, policy)

    with strategy.scope():
        if cfg.features:
            from xray_dist.training.features import read_meta
            from xray_dist.model.network import build_top_model

            shape = tuple(read_meta(cfg.features)["shape"])
            model = build_top_model(spec, shape, cfg.weights, cfg.seed)
            input_spec = tf.TensorSpec((None, *shape), tf.float32)
        else:
            model = build_model(spec, cfg.weights, cfg.seed)
            input_spec = tf.TensorSpec((None, spec.image_size, spec.image_size), tf.uint8)
        if scheme.multilabel:
            loss = masked_weighted_bce(config["pos_weight"])
        else:
            loss = "binary_crossentropy" if scheme.binary else "sparse_categorical_crossentropy"
        model.compile(optimizer=keras.optimizers.Adam(cfg.lr), loss=loss)
    params = trainable_parameters(model)
    t_model = time.time()
    compat.dropout_generators(model)  # dropout's generators exist before a checkpoint is restored into them
    history: list[dict] = []
    start = 0
    whole = bool(config.get("whole_split"))
    ckpt = session.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            load_weights_checked(model, Path(d) / "weights.h5")
            exact = restore_training_state(model, Path(d), strategy)
            state = json.loads((Path(d) / "state.json").read_text())
        history, start = state["history"], state["epoch"]
        if rank == 0:
            how = ("exactly: optimizer, dropout and data order as the uninterrupted run" if exact and whole else
                   "optimizer and dropout state restored; the data order is Ray Data's (the training split is larger "
                   "than worker_cache_mb)" if exact else "weights only: the checkpoint holds no optimizer state")
            log.info("resuming from the checkpoint after epoch %d (%s)", start, how)
    record = _record_worker(cfg, rank, world, strategy, policy, {"train_func_entry": t_entry, "model_ready": t_model},
                            resumed_after_epoch=start)

    plan = StepPlan.make(config["n_train"], world, replicas, cfg.batch_size)
    rows = ShardCache(session.dataset_shard("train"), plan.per_replica_batch, plan.steps * plan.local_replicas,
                      cfg.shuffle_buffer, cfg.seed, cfg.worker_cache_mb * 2**20, whole=whole, rank=rank, world=world,
                      start_epoch=start, local_replicas=plan.local_replicas)
    if rank == 0:
        log.info("input: %s", "global-batch order (split held in memory; the same batches for any cluster shape)"
                 if whole else "Ray Data shard order (streamed: the training split is larger than worker_cache_mb; "
                 "the batches depend on the cluster's shape)")
    train_input = _train_input(strategy, rows, input_spec, (scheme.num_classes + 1,) if scheme.multilabel else ())
    if start >= cfg.epochs:
        # the run had trained every epoch when its process ended (a sweep trial killed between its
        # last checkpoint and its export, say): report the last epoch again, so whoever waits for
        # this run's reports — Tune, with its metric — sees it finish instead of an empty result
        if history:
            session.report(dict(history[-1]), None)
        return
    reporter = _EpochReporter(cfg, scheme, session, history, rank, world, params, replicas, policy, plan,
                              config.get("mlflow"))
    in_sync = _WeightsInSync(cfg, session, strategy, rank, world, record)  # before the reporter: no checkpoint if not
    model.fit(train_input, epochs=cfg.epochs, initial_epoch=start, steps_per_epoch=plan.steps, verbose=0,
              callbacks=[in_sync, reporter])


def _make_reporter_class():
    import tf_keras as keras

    class EpochReporter(keras.callbacks.Callback):
        """After each epoch: rank 0 validates and checkpoints; every worker reports (a barrier)."""

        def __init__(self, cfg, scheme, session, history, rank, world, params, replicas, policy, plan, mlflow=None):
            super().__init__()
            self.cfg, self.scheme, self.history, self.session = cfg, scheme, history, session
            self.val_set = ValidationSet(session.dataset_shard("val"), cfg.worker_cache_mb * 2**20)
            self.rank, self.world, self.n_params, self.replicas, self.policy, self.plan = (
                rank, world, params, replicas, policy, plan)
            self.live = LiveScalars(cfg.out) if rank == 0 else None
            from xray_dist.results.tracking import EpochLogger

            self.tracker = EpochLogger(mlflow) if rank == 0 else None

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.time()

        def on_train_end(self, logs=None):
            if self.live is not None:
                self.live.close()

        def on_train_batch_end(self, batch, logs=None):
            if self.session.should_stop():
                raise RunStopped("stopped by the sweep's scheduler")

        def on_epoch_end(self, epoch, logs=None):
            from xray_dist.results.metrics import evaluate

            seconds = time.time() - self.t0
            images = self.plan.steps * self.plan.per_replica_batch * self.replicas
            metrics = {"epoch": epoch + 1, "world_size": self.world, "loss": float((logs or {}).get("loss", float("nan"))),
                       "epoch_seconds": seconds, "images_per_s": images / seconds,
                       "trainable_parameters": self.n_params, "replicas": self.replicas,
                       "global_batch": self.plan.per_replica_batch * self.replicas}
            tmp = None
            if self.rank == 0:
                probs, labels, paths = _score(self.model, self.val_set.batches(), self.scheme)
                m = evaluate(labels, probs, list(self.scheme.names), multilabel=self.scheme.multilabel)
                per_class = m.pop("val_auc_per_class")
                per_threshold = m.pop("val_thresholds", {})  # multi-label: one per finding
                metrics.update(m)
                metrics.update({f"val_auc_{k}": v for k, v in per_class.items()})
                metrics.update({f"threshold_{k}": v for k, v in per_threshold.items()})
                self.history.append(dict(metrics))
                tmp = Path(tempfile.mkdtemp(prefix="xray_ckpt_"))
                self.model.save_weights(str(tmp / "weights.h5"))
                save_training_state(self.model, tmp)
                (tmp / "state.json").write_text(json.dumps({"epoch": epoch + 1, "history": self.history}))
                np.savez(tmp / "val_scores.npz", probs=probs, labels=labels, paths=paths)
                self.live.write(metrics)
                self.tracker.log(metrics)
                log.info("epoch %d/%d loss %.4f val_loss %.4f val_auc %.3f val_auc_abnormal %.3f "
                         "sens %.2f spec %.2f %.1f img/s (%s)", epoch + 1, self.cfg.epochs, metrics["loss"],
                         m["val_loss"], m["val_auc"], m["val_auc_abnormal"], m["sensitivity"], m["specificity"],
                         metrics["images_per_s"], self.policy)
            self.session.report(metrics, tmp)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    return EpochReporter


class LiveScalars:
    """Rank 0's TensorBoard scalars, written as each epoch ends (``tensorboard --logdir RUN`` shows
    a run while it trains). An object-store run's event file is written locally and uploaded
    after every epoch. The export at the end rewrites ``RUN/tensorboard`` from the whole history
    (:func:`write_tensorboard`), so a resumed run's file holds every epoch once."""

    def __init__(self, out: str):
        self.out = out
        self.remote = storage.is_uri(out)
        self.dir = Path(tempfile.mkdtemp(prefix="xray_tb_")) if self.remote else Path(out) / "tensorboard"
        self.writer = None

    def write(self, row: dict) -> None:
        import tensorflow as tf

        try:
            if self.writer is None:
                self.dir.mkdir(parents=True, exist_ok=True)
                self.writer = tf.summary.create_file_writer(str(self.dir))
            with self.writer.as_default():
                _scalars(row)
            self.writer.flush()
            if self.remote:
                for f in self.dir.iterdir():
                    storage.upload_file(f, storage.join(self.out, "tensorboard", f.name))
        except Exception as e:  # noqa: BLE001 - live curves are a convenience; training goes on without them
            log.warning("live TensorBoard scalars not written (%s: %s)", type(e).__name__, e)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.remote:
            shutil.rmtree(self.dir, ignore_errors=True)


def _scalars(row: dict) -> None:
    import tensorflow as tf

    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            tf.summary.scalar(key, float(value), step=int(row["epoch"]))


def _EpochReporter(*args):  # noqa: N802 - builds the Keras callback lazily (TensorFlow imports in workers only)
    return _make_reporter_class()(*args)


# ---- driver ----------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    out: Path
    metrics: dict
    history: list[dict]
    scheme: ClassScheme


def _check_resume_compatible(cfg: TrainConfig, out: str) -> None:
    try:
        old = storage.read_json(storage.join(out, "config.json"))
    except FileNotFoundError:
        return
    fixed = ("cache", "batch_size", "lr", "head_width", "dropout", "num_classes", "negative_class", "task",
             "unfreeze_blocks", "weights", "seed", "features")
    # a setting the run's config.json predates had its default then
    was = {k: old.get(k, TrainConfig.__dataclass_fields__[k].default) for k in fixed}
    diff = [f"{k}: {was[k]!r} -> {getattr(cfg, k)!r}" for k in fixed if was[k] != getattr(cfg, k)]
    if diff:
        raise XrayDistError(f"--out {out} holds a run with other settings ({'; '.join(diff)}); "
                            "use a new --out, or the same settings to resume it")


def resolve_task(cfg: TrainConfig, labels: list[str]) -> str:
    """``multilabel`` or ``multiclass``: ``cfg.task``, or for ``auto`` what the cache says —
    multi-label when ``prepare`` read a multi-label format or any label holds several (or
    uncertain) findings."""
    from xray_dist.data.classes import is_multilabel_label
    from xray_dist.data.cache import read_report_summary

    if cfg.task != "auto":
        return cfg.task
    if read_report_summary(cfg.cache).get("task") == "multilabel":
        return "multilabel"
    return "multilabel" if any(is_multilabel_label(lab) for lab in labels) else "multiclass"


def run_setup(cfg: TrainConfig) -> tuple[ClassScheme, dict, dict]:
    """Class scheme, model spec and class weights for ``cfg`` (shared by train and tune)."""
    from xray_dist.data.classes import build_multilabel_scheme
    from xray_dist.data.cache import load_spec
    from xray_dist.model.network import ModelSpec

    labels = [lab for _, lab in manifest_labels(cfg.cache)]
    train_labels = [lab for _, lab in manifest_labels(cfg.cache, "train")]
    try:
        if resolve_task(cfg, labels) == "multilabel":
            scheme = build_multilabel_scheme(train_labels, cfg.num_classes, cfg.negative_class)
        else:
            scheme = build_scheme(dict(Counter(train_labels)), cfg.num_classes, cfg.negative_class)
    except ValueError as e:
        raise CacheError(f"{cfg.cache}: {e}") from None
    weights = {}
    if not scheme.multilabel:
        counts = Counter(scheme.mapping[lab] for lab in train_labels)
        weights = balanced_weights({c: counts.get(c, 0) for c in range(scheme.num_classes)})
    spec = ModelSpec(image_size=load_spec(cfg.cache).image_size, num_outputs=scheme.num_outputs,
                     head_width=cfg.head_width, dropout=cfg.dropout, unfreeze_blocks=cfg.unfreeze_blocks,
                     multilabel=scheme.multilabel)
    return scheme, spec.to_dict(), weights


def run_inputs(cfg: TrainConfig, terminal: bool = True) -> tuple[ClassScheme, dict, dict, dict]:
    """Class scheme, model spec, the train/val Ray Datasets and :func:`train_loop`'s config
    (``terminal``: whether the workers' lines are for the terminal; a sweep trial's are not)."""
    scheme, spec, weights = run_setup(cfg)
    train_ds, n_train = split_dataset(cfg.cache, "train", scheme, weights, cfg.features)
    val_ds, _ = split_dataset(cfg.cache, "val", scheme, weights, cfg.features)
    return scheme, spec, {"train": train_ds, "val": val_ds}, make_loop_config(cfg, scheme, spec, n_train, terminal)


def make_loop_config(cfg: TrainConfig, scheme: ClassScheme, spec: dict, n_train: int, terminal: bool = True) -> dict:
    """:func:`train_loop`'s config. ``whole_split``: every worker gets the whole training split and
    takes its part of a (seed, epoch) permutation (:class:`ShardCache`) — when the split fits in
    ``worker_cache_mb``; otherwise each worker streams Ray Data's equal share."""
    from xray_dist.data.classes import positive_weights

    pos_weight = positive_weights(scheme, [lab for _, lab in manifest_labels(cfg.cache, "train")]) \
        if scheme.multilabel else None
    return {"cfg": cfg, "scheme": scheme.to_dict(), "model_spec": spec, "n_train": n_train,
            "whole_split": fits_in_worker(cfg, spec, n_train), "pos_weight": pos_weight, "terminal": terminal}


def make_trainer(cfg: TrainConfig, callbacks: list | None = None, storage_path: str | None = None,
                 terminal: bool = True, mlflow: dict | None = None):
    """The Ray Train trainer for ``cfg`` (the sweep builds its trials' trainers here too): a
    ``DataParallelTrainer`` with the MultiWorkerMirroredStrategy backend — what
    ``TensorflowTrainer`` is, minus a TensorFlow import in the driver and controller
    (:mod:`xray_dist.training.backend`)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from xray_dist.training.backend import MultiWorkerConfig
    from xray_dist.infra.runtime import WORKER_ENV

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
            worker_runtime_env={"env_vars": {**WORKER_ENV, **storage.public_env()}},
        ),
        datasets=datasets,
        # a split that fits goes whole to every worker (a fixed order per epoch, see ShardCache)
        dataset_config=DataConfig(datasets_to_split=[] if loop_config["whole_split"] else ["train"]),
    )
    return trainer, scheme, spec


def export_run(cfg: TrainConfig, result, scheme: ClassScheme, spec: dict, out: Path,
               full_model: bool = True) -> TrainResult:
    """From a finished Ray Train result: exported model, metrics.json, history.csv, plots.

    A run trained on frozen features exports its trained top (``model/top_weights.h5``) and, with
    ``full_model``, the full model too. Sweep trials pass ``full_model=False``: the sweep writes the
    full model of its best trial only, and any other trial's is rebuilt when it is loaded.
    """
    from xray_dist.data.cache import load_spec, read_report_summary
    from xray_dist.model.network import ModelSpec
    from xray_dist.model.artifacts import FULL_WEIGHTS, TOP_WEIGHTS, materialize_full_model, save_spec
    from xray_dist.results.plots import plot_history, plot_roc

    best = _best_checkpoint(result, cfg.metric)
    model_dir = out / MODEL_DIR
    model_dir.mkdir(parents=True, exist_ok=True)
    for stale in (FULL_WEIGHTS, TOP_WEIGHTS):  # a resumed run exports afresh
        (model_dir / stale).unlink(missing_ok=True)
    with best.as_directory() as d:
        shutil.copy(Path(d) / "weights.h5", model_dir / (TOP_WEIGHTS if cfg.features else FULL_WEIGHTS))
        state = json.loads((Path(d) / "state.json").read_text())
        with np.load(Path(d) / "val_scores.npz") as scores:
            probs, labels = scores["probs"], scores["labels"]
            paths = scores["paths"] if "paths" in scores.files else None
    with result.checkpoint.as_directory() as d:
        history = json.loads((Path(d) / "state.json").read_text())["history"]
    best_row = state["history"][-1]
    extra = {"classes": scheme.to_dict(), "preprocess": load_spec(cfg.cache).to_dict(),
             "threshold": best_row["threshold"], "epoch": state["epoch"]}
    if scheme.multilabel:  # each finding's own threshold, chosen on validation (the abnormal score's is "threshold")
        extra["thresholds"] = {k: best_row[f"threshold_{k}"] for k in scheme.keys}
    out = Path(out)
    if cfg.features:
        from xray_dist.training.features import read_meta

        # the frozen base under the trained top: the same weights source and seed as the features
        extra["top"] = {"features_shape": read_meta(cfg.features)["shape"], "weights": cfg.weights, "seed": cfg.seed}
        if cfg.weights not in ("imagenet", "none"):  # pinned by content: the file at that path may be replaced
            extra["top"]["weights_sha256"] = storage.content_sha256(cfg.weights)
    save_spec(model_dir, ModelSpec.from_dict(spec), extra)
    if cfg.features and full_model:
        materialize_full_model(model_dir)
    save_scores(out / "val_scores.npz", cfg.cache, probs, labels, paths)
    with (out / "history.csv").open("w", newline="") as f:
        keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    final = history[-1]
    metrics = {
        "final": final, "best": best_row, "best_epoch": state["epoch"], "epochs": len(history),
        "metric": cfg.metric, "val_auc": best_row["val_auc"], "val_auc_abnormal": best_row["val_auc_abnormal"],
        "sensitivity": best_row["sensitivity"], "specificity": best_row["specificity"],
        "trainable_parameters": final["trainable_parameters"],
        "images_per_s": float(np.mean([h["images_per_s"] for h in history])),
        "classes": list(scheme.names), "task": "multilabel" if scheme.multilabel else "multiclass",
        **({"val_auc_mean": best_row["val_auc_mean"]} if scheme.multilabel else {}),
        "config": cfg.to_dict(), "dataset": read_report_summary(cfg.cache),
        "complete": len(history) >= cfg.epochs,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    plot_history(history, out / "training_curves.png")
    plot_roc(labels, probs, list(scheme.names), out / "roc.png", multilabel=scheme.multilabel)
    write_tensorboard(history, out / "tensorboard")
    return TrainResult(out=out, metrics=metrics, history=history, scheme=scheme)


def save_scores(path: Path, cache: str, probs: np.ndarray, labels: np.ndarray, paths: np.ndarray | None) -> None:
    """``val_scores.npz``: probabilities, labels, and each image's name and salted patient key from
    the cache's manifest, so intervals can resample patients (:mod:`xray_dist.results.metrics`)."""
    extra = {}
    if paths is not None:
        from xray_dist.data.cache import load_manifest

        m = load_manifest(cache)
        patient_of = dict(zip(m.column("path").to_pylist(), m.column("patient").to_pylist()))
        extra = {"paths": np.asarray(paths, dtype=str),
                 "patients": np.asarray([patient_of.get(str(p), "") for p in paths], dtype=str)}
    np.savez(path, probs=probs, labels=labels, **extra)


def write_tensorboard(history: list[dict], logdir: Path) -> None:
    """Every per-epoch number of the history as TensorBoard scalars (``tensorboard --logdir RUN``).

    Written by the driver from the reports when the run ends, so it is complete wherever the
    workers ran (rank 0 writes each epoch live meanwhile: :class:`LiveScalars`); a resumed run
    rewrites the whole file from the full history.
    """
    import tensorflow as tf

    if logdir.exists():
        shutil.rmtree(logdir)
    writer = tf.summary.create_file_writer(str(logdir))
    with writer.as_default():
        for row in history:
            _scalars(row)
    writer.close()


def _json_default(o):
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def _best_checkpoint(result, metric: str):
    cands = [(m.get(metric), c) for c, m in (result.best_checkpoints or []) if m.get(metric) is not None]
    cands = [(v, c) for v, c in cands if not (isinstance(v, float) and math.isnan(v))]
    if cands:
        return max(cands, key=lambda vc: vc[0])[1]
    if result.checkpoint is None:
        raise XrayDistError(f"training reported no checkpoint (error: {result.error})")
    return result.checkpoint


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) training as described by ``cfg``; write everything into ``cfg.out``."""
    cfg = cfg.resolved()
    for where in (cfg.out, cfg.cache, *([cfg.weights] if cfg.weights not in ("imagenet", "none") else [])):
        storage.check_location(where)
    if cfg.weights not in ("imagenet", "none") and not storage.is_file(cfg.weights):
        raise ModelSpecError(f"--weights {cfg.weights}: no such file")
    from xray_dist.infra.locks import TargetLock

    with TargetLock(cfg.out, "xray-dist train"):  # one writer per run directory
        return _train_locked(cfg)


def _train_locked(cfg: TrainConfig) -> TrainResult:
    from xray_dist.infra.runtime import init_ray

    _check_resume_compatible(cfg, cfg.out)
    fp = fingerprint.check_unchanged(cfg.out, cfg.cache, "run")  # a re-split cache must not be resumed on
    storage.makedirs(cfg.out)
    storage.write_json(storage.join(cfg.out, "config.json"), cfg.to_dict(), indent=2)
    fingerprint.record(cfg.out, cfg.cache, fp)
    init_ray(cfg.address)
    from xray_dist.results import tracking
    from xray_dist.data.cache import read_report_summary

    target = tracking.start_train_run(cfg, fp["id"], read_report_summary(cfg.cache))
    trainer, scheme, spec = make_trainer(cfg, mlflow=target)
    t0 = time.time()
    result = trainer.fit()
    if result.error:
        tracking.fail_train_run(target)
        raise XrayDistError(f"training failed: {result.error}") from result.error
    # exports are written locally, then (object storage) uploaded: the model and TensorBoard
    # directories are replaced whole, so a resumed run leaves no stale file behind
    with storage.staged_output(cfg.out, replace=(MODEL_DIR, "tensorboard"), marker="metrics.json") as local_out:
        res = export_run(cfg, result, scheme, spec, local_out)
        res.metrics["wall_seconds"] = round(time.time() - t0, 1)
        res.metrics["cache_fingerprint"] = fp["id"]
        (local_out / "metrics.json").write_text(json.dumps(res.metrics, indent=2, default=_json_default))
        tracking.finish_train_run(target, local_out, res.metrics["complete"])
    res.out = cfg.out if storage.is_uri(cfg.out) else Path(cfg.out)
    return res
