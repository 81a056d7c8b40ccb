"""The training input: from the prepared cache to each replica's batches, and the devices they feed.

Ray Data reads the Parquet cache (:func:`split_dataset`: the model input, the label and the
class's balancing weight ``n / (K · n_k)``, carried as a column). A training split that fits in
``worker_cache_mb`` (:func:`fits_in_worker`) goes whole to every worker, and global step ``s``
trains the ``s``-th global batch of the epoch's seeded permutation, each replica its slice
(:class:`ShardCache`): the same batches for any spread of the replicas over workers and devices.
A bigger split: ``DataConfig`` gives each worker an equal shard (equal rows → equal batches → no
MWMS hang on the last batch), kept in the worker's memory after the first epoch when it fits,
reshuffled every epoch and prefetched; its batches depend on the number of workers.
:func:`train_input` turns a worker's :class:`ShardCache` into the ``tf.data`` pipeline
``distribute_datasets_from_function`` deals out, elements being per-replica batches (the global
batch is ``batch_size × replicas``); :func:`configure_devices` picks the strategy and precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray_dist.config import TrainConfig
from xray_dist.data.cache import CacheLayout, read_cache_parquet, split_labels
from xray_dist.data.classes import ClassScheme
from xray_dist.errors import XrayDistError
from xray_dist.infra import storage
from xray_dist.model.precision import resolve
from xray_dist.training import augment
from xray_dist.training.features import read_meta

DATA_CPUS = 0.25


# ---- the splits, as Ray Datasets ----------------------------------------------------------------------

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
    return (storage.join(features, "shards"), "x") if features else (CacheLayout(str(cache)).images, "image")


def split_dataset(cache: str | Path, split: str, scheme: ClassScheme, class_weight: dict[int, float],
                  features: str | None = None):
    """A Ray Dataset of one split: ``x`` (S×S uint8 image, or frozen features), ``label``, ``weight``."""
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
        return 4 * int(np.prod(read_meta(cfg.features)["shape"]))
    return int(spec["image_size"]) ** 2


def fits_in_worker(cfg: TrainConfig, spec: dict, rows: int) -> bool:
    """Whether ``rows`` model inputs fit in one worker's ``worker_cache_mb``."""
    return rows * row_bytes(cfg, spec) <= cfg.worker_cache_mb * 2**20


# ---- one worker's devices and batches -------------------------------------------------------------------

def configure_devices(cfg: TrainConfig, world: int):
    """Logical CPU devices (``cpu_replicas``), the precision; returns (strategy, the resolved precision).

    Between workers ``MultiWorkerMirroredStrategy`` (which also mirrors over every GPU of each
    worker); one worker with several devices ``MirroredStrategy``; one device, no collectives."""
    import tensorflow as tf  # TensorFlow: workers only
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
    chosen = resolve(cfg.precision, training=True)
    keras.mixed_precision.set_global_policy(chosen.policy)
    if world > 1:
        comm = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.NCCL if gpus
            else tf.distribute.experimental.CommunicationImplementation.RING)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=comm)
    else:
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or \
                  [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices) if len(devices) > 1 else tf.distribute.get_strategy()
    return strategy, chosen


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


@dataclass(frozen=True)
class BatchOrder:
    """How one worker's rows become its batches (:class:`ShardCache`).

    ``batch_size``: rows per replica batch; ``per_pass``: batches a pass yields (steps × local
    replicas); ``shuffle_buffer``: Ray Data's local shuffle buffer for a streamed first pass;
    ``seed``: with the epoch, the permutation of kept rows; ``limit_bytes``: the most a streamed
    share may take in memory (``worker_cache_mb``); ``whole``: every worker holds the whole split
    and takes its part of one global permutation, as replicas ``rank·k … rank·k + k − 1`` of
    ``world·k`` (``k = local_replicas``).
    """

    batch_size: int
    per_pass: int
    shuffle_buffer: int
    seed: int
    limit_bytes: int
    whole: bool = False
    rank: int = 0
    world: int = 1
    local_replicas: int = 1
    augment: str = "none"

    @classmethod
    def for_worker(cls, cfg: TrainConfig, plan: StepPlan, rank: int, world: int, whole: bool) -> "BatchOrder":
        """A worker's order for ``cfg`` under ``plan``."""
        return cls(plan.per_replica_batch, plan.steps * plan.local_replicas, cfg.shuffle_buffer, cfg.seed,
                   cfg.worker_cache_mb * 2**20, whole=whole, rank=rank, world=world,
                   local_replicas=plan.local_replicas, augment=cfg.augment)


class ShardCache:
    """This worker's training batches, one pass per epoch, in an order set by (seed, epoch) alone
    where the rows allow it (:class:`BatchOrder` holds the settings).

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

    Either way a pass yields exactly ``per_pass`` full batches (equal steps on every worker), each
    image augmented (``augment``) from (seed, epoch, its name): :mod:`xray_dist.training.augment`.
    ``start_epoch``: the epoch the last pass trained (a resumed run starts after its checkpoint).
    """

    def __init__(self, shard, order: BatchOrder, start_epoch: int = 0):
        self.shard, self.order = shard, order
        self.rows: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self.epoch = start_epoch

    def _stream(self, shuffle: bool = True):
        o = self.order
        local = shuffle and o.shuffle_buffer
        it = self.shard.iter_batches(batch_size=o.batch_size, batch_format="numpy", prefetch_batches=2,
                                     drop_last=False, local_shuffle_buffer_size=o.shuffle_buffer if local else None,
                                     local_shuffle_seed=o.seed * 1000 + self.epoch if local else None)
        return ((b["path"], b["x"], b["label"].astype(np.float32), b["weight"]) for b in it)

    def _keep(self, parts: list) -> None:
        paths, x, y, w = (np.concatenate(p) for p in zip(*parts))
        order = np.argsort(paths, kind="stable")  # a fixed order, whatever order the rows came in
        self.rows = (x[order], y[order], w[order], paths[order])

    def _permutation(self, n: int) -> np.ndarray:
        return np.random.default_rng(self.order.seed * 1000 + self.epoch).permutation(n)

    def batches(self):
        """One pass: exactly ``per_pass`` full batches."""
        o = self.order
        self.epoch += 1
        if o.whole and self.rows is None:
            self._keep([b for b in self._stream(shuffle=False)])
        if self.rows is not None:
            x, y, w, paths = self.rows
            order = self._permutation(len(x))
            for i in range(o.per_pass):
                start = self._global_batch_start(i) if o.whole else i * o.batch_size
                idx = order[start : start + o.batch_size]
                yield self._batch(x[idx], y[idx], w[idx], paths[idx])
            return
        yield from self._first_pass()

    def _batch(self, x, y, w, paths) -> tuple:
        """``(x, y, w)``; with ``augment``, also each image's draws (:func:`augment.draws`, from
        (seed, epoch, its name)), which :func:`train_input` applies inside ``tf.data``."""
        if self.order.augment == "none":
            return x, y, w
        return x, y, w, augment.draws(paths, self.order.seed, self.epoch).astype(np.float32)

    def _first_pass(self):
        """A streamed pass, keeping its rows (the whole share) for later epochs when they fit."""
        o = self.order
        keep: list | None = [] if o.limit_bytes > 0 else None
        size = yielded = 0
        for p, x, y, w in self._rebatched():
            if keep is not None:
                size += x.nbytes
                if size <= o.limit_bytes:
                    keep.append((p, x, y, w))
                else:
                    keep = None  # too big for memory: stream every epoch
            if yielded < o.per_pass and len(x) == o.batch_size:  # full batches only: equal steps everywhere
                yielded += 1
                yield self._batch(x, y, w, p)
        if keep:
            self._keep(keep)

    def _global_batch_start(self, i: int) -> int:
        """Where this worker's ``i``-th batch of a pass starts in the epoch's permutation (whole split):
        step ``i // k``'s global batch, the slot of local replica ``i % k``."""
        o = self.order
        step, j = divmod(i, o.local_replicas)
        return (step * o.world * o.local_replicas + o.rank * o.local_replicas + j) * o.batch_size

    def _rebatched(self):
        """The stream in full batches, then the remainder. Ray Data can hand over a short batch in
        the middle of a streamed share (seen: 4, 4, 1, 4 for 13 rows in batches of 4), which would
        leave this worker a batch short of the others; rows are carried over instead."""
        size = self.order.batch_size
        parts: list = []
        n = 0
        for part in self._stream():
            parts.append(part)
            n += len(part[1])
            if n < size:
                continue
            rows = [np.concatenate(c) for c in zip(*parts)]
            full = n - n % size
            for i in range(0, full, size):
                yield tuple(a[i : i + size] for a in rows)
            parts = [tuple(a[full:] for a in rows)] if full < n else []
            n -= full
        if n:
            yield tuple(np.concatenate(c) for c in zip(*parts))


def train_input(strategy, cache: ShardCache, input_spec, label_shape: tuple = ()):
    """An endless tf.data input over this worker's :class:`ShardCache`; elements are per-replica batches.

    Each pass yields exactly ``steps × local replicas`` full batches — the rest of a Ray Data pass
    is drained unused — so Keras epochs and data passes stay aligned on every worker
    (MultiWorkerMirroredStrategy hangs on unequal batch counts).
    """
    import tensorflow as tf  # TensorFlow: workers only

    def gen():
        while True:
            yield from cache.batches()

    sig = (input_spec, tf.TensorSpec((None, *label_shape), tf.float32),
           tf.TensorSpec((None,), tf.float32))
    augmented = cache.order.augment != "none"
    if augmented:  # each batch carries its images' draws; the transform runs here, in parallel
        sig += (tf.TensorSpec((None, 6), tf.float32),)

    def dataset_fn(_ctx):
        ds = tf.data.Dataset.from_generator(gen, output_signature=sig)
        if augmented:
            ds = ds.map(lambda x, y, w, p: (augment.apply(x, p), y, w), num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=True)
        ds = ds.prefetch(tf.data.AUTOTUNE)
        opts = tf.data.Options()
        opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return ds.with_options(opts)

    if strategy.num_replicas_in_sync == 1:
        return dataset_fn(None)
    return strategy.distribute_datasets_from_function(dataset_fn)
