"""What happens at the end of each epoch on a worker: the Keras callbacks of :func:`train_loop`.

:class:`WeightsInSync` (first): every rank hashes its trainable weights and compares them with
rank 0's. The epoch reporter (then): rank 0 scores the whole validation split through the
compiled forward pass predict uses (no collectives; :class:`ValidationSet`), computes the metrics of
:mod:`xray_dist.results.metrics`, writes the checkpoint (weights, optimizer and RNG state, the
epoch history, validation scores), TensorBoard scalars and the MLflow epoch; every worker then
reports (a barrier). Each epoch is recorded once: the history travels inside the checkpoint.

The callback classes subclass ``tf_keras.callbacks.Callback``, so they are built on first use
(:func:`epoch_reporter`, :func:`weights_in_sync`): TensorFlow is imported in workers only.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray_dist.config import TrainConfig
from xray_dist.data.classes import ClassScheme
from xray_dist.errors import RunStopped, XrayDistError
from xray_dist.infra import storage
from xray_dist.results.metrics import evaluate
from xray_dist.results.tracking import EpochLogger
from xray_dist.training.pipeline import StepPlan
from xray_dist.training.scalars import LiveScalars
from xray_dist.training.state import save_training_state, weights_digest

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """One worker's place in its run: settings, classes, the session it reports to, its rank among
    ``world`` workers, and its distribution strategy and precision policy."""

    cfg: TrainConfig
    scheme: ClassScheme
    session: object  # RayTrainSession, or inprocess.InProcessSession
    rank: int
    world: int
    strategy: object
    policy: str  # the Keras policy: float32, mixed_bfloat16 or mixed_float16
    precision_why: str = ""  # why (xray_dist.model.precision.resolve)

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def record_path(self) -> str:
        """``RUN/workers/rank<N>.json``: where this worker ran, on what, and its weights' digest."""
        return storage.join(self.cfg.out, "workers", f"rank{self.rank}.json")


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


def score(model, batches, scheme: ClassScheme) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities ``(n, K)``, labels and paths for ``(x, label, path)`` batches, through the
    compiled forward pass predict uses (:func:`~xray_dist.model.network.scorer`)."""
    from xray_dist.model.network import scorer  # TensorFlow: in the training process

    run = scorer(model)
    probs, labels, paths = [], [], []
    for x, y, p in batches:
        probs.append(run(x).astype(np.float64))
        labels.append(y)
        paths.append(np.asarray(p, dtype=str))
    return scheme.probabilities(np.concatenate(probs)), np.concatenate(labels).astype(int), np.concatenate(paths)


def write_checkpoint(model, directory: Path, epoch: int, history: list[dict], scores: tuple,
                     precision: str | None = None) -> None:
    """An epoch's checkpoint: ``weights.h5``, the training state (:mod:`xray_dist.training.state`),
    ``val_scores.npz`` and ``state.json`` (the epoch, the whole history, what it computed in)."""
    probs, labels, paths = scores
    model.save_weights(str(directory / "weights.h5"))
    save_training_state(model, directory)
    storage.write_json(directory / "state.json", {"epoch": epoch, "history": history, "precision": precision})
    np.savez(directory / "val_scores.npz", probs=probs, labels=labels, paths=paths)


@functools.cache
def _weights_in_sync_class():
    """The Keras callback class (built once per process: tf_keras is imported here, in workers)."""
    import tf_keras as keras  # TensorFlow: workers only

    class WeightsInSync(keras.callbacks.Callback):
        """After each epoch, before validation and the checkpoint: every rank hashes its trainable
        weights (:func:`~xray_dist.training.state.weights_digest`) into ``RUN/workers/rank<N>.json``
        (``weights_digest``: epoch and sha256) and compares it with rank 0's; a rank whose weights
        differ — the gradient all-reduce did not keep the workers in step — stops the run with an
        error that names both digests."""

        def __init__(self, ctx: WorkerContext, record: dict):
            super().__init__()
            self.ctx, self.record = ctx, record

        def on_epoch_end(self, epoch, logs=None):
            ctx = self.ctx
            digest = weights_digest(self.model, ctx.strategy)
            self.record["weights_digest"] = {"epoch": epoch + 1, "sha256": digest}
            storage.write_json(ctx.record_path(), self.record, indent=2)
            if ctx.world > 1:
                first = ctx.session.broadcast_from_rank_zero(digest)
                if first != digest:
                    raise XrayDistError(f"rank {ctx.rank}: the trainable weights after epoch {epoch + 1} differ from "
                                        f"rank 0's (sha256 {digest[:12]} vs {first[:12]}): the workers' gradients "
                                        "were not all-reduced")

    return WeightsInSync


@functools.cache
def _epoch_reporter_class():
    """The Keras callback class (built once per process: tf_keras is imported here, in workers)."""
    import tf_keras as keras  # TensorFlow: workers only

    class EpochReporter(keras.callbacks.Callback):
        """After each epoch: rank 0 validates and checkpoints; every worker reports (a barrier)."""

        def __init__(self, ctx: WorkerContext, plan: StepPlan, history: list[dict], n_params: int,
                     mlflow: dict | None = None):
            super().__init__()
            self.ctx, self.plan, self.history, self.n_params = ctx, plan, history, n_params
            lead = ctx.rank == 0
            self.val_set = ValidationSet(ctx.session.dataset_shard("val"), ctx.cfg.worker_cache_mb * 2**20)
            self.live = LiveScalars(ctx.cfg.out) if lead else None
            self.tracker = EpochLogger(mlflow) if lead else None

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.time()

        def on_train_end(self, logs=None):
            if self.live is not None:
                self.live.close()

        def on_train_batch_end(self, batch, logs=None):
            if self.ctx.session.should_stop():
                raise RunStopped("stopped by the sweep's scheduler")

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.time() - self.t0
            replicas = self.ctx.replicas
            images = self.plan.steps * self.plan.per_replica_batch * replicas
            metrics = {"epoch": epoch + 1, "world_size": self.ctx.world,
                       "loss": float((logs or {}).get("loss", float("nan"))),
                       "epoch_seconds": seconds, "images_per_s": images / seconds,
                       "trainable_parameters": self.n_params, "replicas": replicas,
                       "global_batch": self.plan.per_replica_batch * replicas}
            tmp = Path(tempfile.mkdtemp(prefix="xray_ckpt_")) if self.ctx.rank == 0 else None
            if tmp is not None:
                self._validate_and_checkpoint(epoch, metrics, tmp)
            self.ctx.session.report(metrics, tmp)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

        def _validate_and_checkpoint(self, epoch: int, metrics: dict, tmp: Path) -> None:
            """Rank 0: the validation metrics into ``metrics`` and the history, the checkpoint into ``tmp``."""
            scheme = self.ctx.scheme
            scores = score(self.model, self.val_set.batches(), scheme)
            probs, labels, _ = scores
            m = evaluate(labels, probs, list(scheme.names), multilabel=scheme.multilabel)
            per_class = m.pop("val_auc_per_class")
            per_threshold = m.pop("val_thresholds", {})  # multi-label: one per finding
            metrics.update(m)
            metrics.update({f"val_auc_{k}": v for k, v in per_class.items()})
            metrics.update({f"threshold_{k}": v for k, v in per_threshold.items()})
            self.history.append(dict(metrics))
            write_checkpoint(self.model, tmp, epoch + 1, self.history, scores,
                             self.ctx.policy.removeprefix("mixed_"))
            self.live.write(metrics)
            self.tracker.log(metrics)
            log.info("epoch %d/%d loss %.4f val_loss %.4f val_auc %.3f val_auc_abnormal %.3f "
                     "sens %.2f spec %.2f %.1f img/s (%s)", epoch + 1, self.ctx.cfg.epochs, metrics["loss"],
                     m["val_loss"], m["val_auc"], m["val_auc_abnormal"], m["sensitivity"], m["specificity"],
                     metrics["images_per_s"], self.ctx.policy.removeprefix("mixed_")
                     + ("" if self.ctx.cfg.augment == "none" else f", augment {self.ctx.cfg.augment}"))

    return EpochReporter


def weights_in_sync(ctx: WorkerContext, record: dict):
    """The Keras callback that checks every rank's weights against rank 0's after each epoch."""
    return _weights_in_sync_class()(ctx, record)


def epoch_reporter(ctx: WorkerContext, plan: StepPlan, history: list[dict], n_params: int, mlflow: dict | None = None):
    """The Keras callback that validates, checkpoints and reports each epoch."""
    return _epoch_reporter_class()(ctx, plan, history, n_params, mlflow)
