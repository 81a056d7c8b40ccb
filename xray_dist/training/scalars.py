"""A run's TensorBoard scalars (``RUN/tensorboard``; ``tensorboard --logdir RUN``).

Rank 0 writes each epoch's numbers live as the epoch ends (:class:`LiveScalars`); the export at
the end rewrites the directory from the whole history (:func:`write_tensorboard`), so a resumed
run's file holds every epoch once. TensorFlow is imported only when a scalar is written.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path

from xray_dist.infra import storage

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"


def _scalars(row: dict) -> None:
    import tensorflow as tf  # TensorFlow: only where scalars are written

    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            tf.summary.scalar(key, float(value), step=int(row["epoch"]))


class LiveScalars:
    """Rank 0's TensorBoard scalars, written as each epoch ends (``tensorboard --logdir RUN`` shows
    a run while it trains). An object-store run's event file is written locally and uploaded
    after every epoch. The export at the end rewrites ``RUN/tensorboard`` from the whole history
    (:func:`write_tensorboard`), so a resumed run's file holds every epoch once."""

    def __init__(self, out: str):
        self.out = out
        self.remote = storage.is_uri(out)
        self.dir = Path(tempfile.mkdtemp(prefix="xray_tb_")) if self.remote else Path(out) / TENSORBOARD_DIR
        self.writer = None

    def write(self, row: dict) -> None:
        import tensorflow as tf  # TensorFlow: workers only

        try:
            if self.writer is None:
                self.dir.mkdir(parents=True, exist_ok=True)
                self.writer = tf.summary.create_file_writer(str(self.dir))
            with self.writer.as_default():
                _scalars(row)
            self.writer.flush()
            if self.remote:
                for f in self.dir.iterdir():
                    storage.upload_file(f, storage.join(self.out, TENSORBOARD_DIR, f.name))
        except Exception as e:  # noqa: BLE001 - live curves are a convenience; training goes on without them
            log.warning("live TensorBoard scalars not written (%s: %s)", type(e).__name__, e)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.remote:
            shutil.rmtree(self.dir, ignore_errors=True)


def write_tensorboard(history: list[dict], logdir: Path) -> None:
    """Every per-epoch number of the history as TensorBoard scalars (``tensorboard --logdir RUN``).

    Written by the driver from the reports when the run ends, so it is complete wherever the
    workers ran (rank 0 writes each epoch live meanwhile: :class:`LiveScalars`); a resumed run
    rewrites the whole file from the full history.
    """
    import tensorflow as tf  # TensorFlow: only where scalars are written

    if logdir.exists():
        shutil.rmtree(logdir)
    writer = tf.summary.create_file_writer(str(logdir))
    with writer.as_default():
        for row in history:
            _scalars(row)
    writer.close()
