"""One-worker training in the calling process: :func:`xray_dist.training.worker.train_loop` without a Ray
Train controller and worker group.

A sweep trial on frozen features trains a few thousand parameters for a few seconds; launched
through Ray Train it first waits for a controller actor and a worker process to start and import
TensorFlow (measured: ~25 s of a ~50 s trial on 2 cores, see BENCHMARKS.md). Sweeps therefore run
one-worker trials here, inside the Tune trial's own process, which Tune reuses for the next trial
(``reuse_actors``), so TensorFlow is imported once per trial slot, not once per trial. It is the
same loop on the same rows; only the session and the way the rows are read differ:

- the splits are read straight from the cache's Parquet files with pyarrow (:class:`LocalSplit`)
  when they fit in the run's ``worker_cache_mb``: a Ray Dataset's first pass in a fresh trial
  process starts read and map tasks, their worker processes and the streaming executor, which
  made a small trial's first epoch 5.2 s instead of 0.7 s (bench/run.py, BENCHMARKS.md). Larger
  splits stream through the same Ray Datasets as a Train worker's, whole (one worker: the shard
  is everything),
- every checkpoint goes to ``RUN/checkpoints/epoch_NNNN`` (the best by the run's metric and the
  latest are kept), and the latest one is where a rerun of the trial resumes,
- each report goes to ``on_report`` (a sweep passes ``ray.tune.report``, so ASHA sees every epoch),
- ``should_stop`` is polled after every batch: Tune reuses a trial's process only if the stopped
  trial's thread ends within ``TUNE_FUNCTION_THREAD_TIMEOUT_S`` (else it fails the *next* trial),
  so a trial ASHA stops must end within a batch, not at the end of its epoch.

Multi-worker runs, and runs that split the CPU into logical devices, always use Ray Train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.compute as pc

from xray_dist.config import TrainConfig
from xray_dist.data.cache import parquet_dataset, split_labels
from xray_dist.errors import CacheError
from xray_dist.infra import storage
from xray_dist.training.inputs import make_loop_config, run_setup
from xray_dist.training.pipeline import attach_labels, fits_in_worker, split_dataset, split_source
from xray_dist.training.worker import train_loop

CHECKPOINTS = "checkpoints"


@dataclass
class LocalResult:
    """The parts of a Ray Train ``Result`` that :func:`xray_dist.training.export.export_run` reads."""

    checkpoint: object | None
    best_checkpoints: list = field(default_factory=list)  # [(Checkpoint, metrics)]
    error: Exception | None = None


class LocalSplit:
    """One split of the cache (images or frozen features) in memory, read with pyarrow: the part of
    a Ray Data shard's interface that :class:`~xray_dist.training.pipeline.ShardCache` and
    :class:`~xray_dist.training.callbacks.ValidationSet` use (``iter_batches``), with the same rows and
    columns (``x``, ``label``, ``weight``) as :func:`xray_dist.training.pipeline.split_dataset`."""

    def __init__(self, source: str, column: str, label_of: dict[str, int], class_weight: dict[int, float]):
        from ray.data.block import BlockAccessor  # Ray: its tensor columns as arrays

        table = parquet_dataset(source).to_table(
            columns=["path", column], filter=pc.field("path").isin(list(label_of)))
        table = table.sort_by("path")  # files list in any order: rows in a fixed one
        batch = BlockAccessor.for_block(table).to_batch_format("numpy")  # Ray's tensor columns → ndarrays
        self.rows = attach_labels(batch, label_of, class_weight, column)
        missing = sorted(set(label_of) - set(batch["path"]))  # the table holds the split's paths only
        if missing:
            raise CacheError(f"{source}: {len(missing)} of the split's {len(label_of)} images have no row there "
                             f"(first: {missing[0]}); the cache or its features are incomplete — prepare again, "
                             "or delete the features directory so the sweep recomputes it")

    def iter_batches(self, batch_size: int, batch_format: str = "numpy", drop_last: bool = False,
                     local_shuffle_buffer_size: int | None = None, local_shuffle_seed: int | None = None,
                     **_ignored):
        n = len(self.rows["label"])
        order = (np.random.default_rng(local_shuffle_seed).permutation(n) if local_shuffle_buffer_size
                 else np.arange(n))
        stop = n - n % batch_size if drop_last else n
        for i in range(0, stop, batch_size):
            idx = order[i : i + batch_size]
            yield {k: v[idx] for k, v in self.rows.items()}


def in_process_inputs(cfg: TrainConfig, terminal: bool = False) -> tuple:
    """:func:`xray_dist.training.inputs.run_inputs` for a run in this process: each split as a
    :class:`LocalSplit` when it fits in ``cfg.worker_cache_mb``, as the Ray Dataset otherwise."""
    scheme, spec, class_weight = run_setup(cfg)
    source, column = split_source(cfg.cache, cfg.features)
    datasets, sizes = {}, {}
    for name in ("train", "val"):
        label_of = split_labels(cfg.cache, name, scheme)
        sizes[name] = len(label_of)
        if fits_in_worker(cfg, spec, len(label_of)):
            datasets[name] = LocalSplit(source, column, label_of, class_weight)
        else:
            datasets[name], _ = split_dataset(cfg.cache, name, scheme, class_weight, cfg.features)
    # a sweep trial's lines go to the log (Tune's progress is the terminal's); a train command's to the terminal
    return scheme, spec, datasets, make_loop_config(cfg, scheme, spec, sizes["train"], terminal=terminal)


class InProcessSession:
    """The :class:`xray_dist.training.worker.RayTrainSession` interface for a one-worker run in this process."""

    def __init__(self, datasets: dict, store: str | Path, metric: str,
                 on_report: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None):
        self.datasets, self.store, self.metric, self.on_report = datasets, str(store), metric, on_report
        self._should_stop = should_stop
        storage.makedirs(self.store)
        self.kept: dict[int, dict] = {}  # epoch -> metrics
        for d in storage.list_dirs(self.store):
            path = storage.join(self.store, d)
            if not d.startswith("epoch_"):  # cut off while being copied
                storage.delete_dir(path)
                continue
            try:  # a rerun: what the earlier attempt saved (state.json is written last)
                self.kept[int(d.split("_")[1])] = storage.read_json(storage.join(path, "state.json"))["history"][-1]
            except FileNotFoundError:
                storage.delete_dir(path)

    def rank_world(self) -> tuple[int, int]:
        return 0, 1

    def should_stop(self) -> bool:
        """Checked after every batch: the loop raises :class:`~xray_dist.errors.RunStopped` when true."""
        return bool(self._should_stop and self._should_stop())

    def dataset_shard(self, name: str):
        return self.datasets[name]

    def _checkpoint(self, epoch: int):
        from ray.train import Checkpoint  # Ray: heavy; a trial process has it loaded already

        path, fs = storage.ray_storage(storage.join(self.store, f"epoch_{epoch:04d}"))
        return Checkpoint(path, filesystem=fs) if fs is not None else Checkpoint.from_directory(path)

    def get_checkpoint(self):
        return self._checkpoint(max(self.kept)) if self.kept else None

    def _score(self, epoch: int) -> float:
        v = self.kept[epoch].get(self.metric)
        return -math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None:
            epoch = int(metrics["epoch"])
            # whole or absent: locally copied aside and renamed; on object storage state.json last
            storage.put_dir(checkpoint_dir, storage.join(self.store, f"epoch_{epoch:04d}"), marker="state.json",
                            replace=True)
            self.kept[epoch] = dict(metrics)
            best = max(self.kept, key=lambda e: (self._score(e), e))
            for e in [e for e in self.kept if e not in (best, epoch)]:
                storage.delete_dir(storage.join(self.store, f"epoch_{e:04d}"))
                del self.kept[e]
        if self.on_report is not None:
            self.on_report(metrics)

    def result(self) -> LocalResult:
        if not self.kept:
            return LocalResult(checkpoint=None, error=RuntimeError("training reported no checkpoint"))
        return LocalResult(checkpoint=self.get_checkpoint(),
                           best_checkpoints=[(self._checkpoint(e), m) for e, m in sorted(self.kept.items())])


def can_run_in_process(cfg: TrainConfig) -> bool:
    return cfg.num_workers == 1 and cfg.cpu_replicas <= 1


def train_in_process(cfg: TrainConfig, on_report: Callable[[dict], None] | None = None,
                     should_stop: Callable[[], bool] | None = None, mlflow: dict | None = None,
                     terminal: bool = False):
    """Run :func:`xray_dist.training.worker.train_loop` here; returns (result, scheme, model spec) like a
    trainer's fit.

    ``train --runner inprocess`` and one-worker sweep trials run here. ``should_stop`` is polled
    after every batch; once it is true the loop raises
    :class:`~xray_dist.errors.RunStopped` within a batch, so a stopped sweep trial frees its (reused)
    process at once instead of finishing its epoch.
    """
    import tf_keras as keras  # TensorFlow: only where a run trains

    if not can_run_in_process(cfg):
        raise ValueError(f"in-process training needs num_workers=1 and no cpu_replicas. Received: "
                         f"num_workers={cfg.num_workers}, cpu_replicas={cfg.cpu_replicas}")
    scheme, spec, datasets, loop_config = in_process_inputs(cfg, terminal)
    loop_config["mlflow"] = mlflow  # a train command's MLflow run (rank 0 logs each epoch: here)
    session = InProcessSession(datasets, storage.join(cfg.out, CHECKPOINTS), cfg.metric, on_report, should_stop)
    keras.backend.clear_session()  # this process may have trained another trial before
    policy = keras.mixed_precision.global_policy().name
    try:
        train_loop(loop_config, session)
    finally:  # the run's precision is its own: this process's later models are built as before
        keras.mixed_precision.set_global_policy(policy)
    return session.result(), scheme, spec
