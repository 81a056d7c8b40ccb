"""The Ray Train backend for MultiWorkerMirroredStrategy, without importing TensorFlow.

It does what ``ray.train.tensorflow.TensorflowConfig`` does — before training starts, every worker
gets ``TF_CONFIG`` naming all workers' addresses and its own index, which
``MultiWorkerMirroredStrategy`` reads — but lives outside the ``ray.train.tensorflow`` package,
whose ``__init__`` imports TensorFlow. Ray Train's controller and each Tune trial process
unpickle the backend config, so with Ray's class each of them paid a TensorFlow import (~4 s
here) before any worker started; only the workers need TensorFlow.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig

from xray_dist.infra import compat


def _set_tf_config(worker_addresses: list[str], index: int) -> None:
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": worker_addresses},
                                          "task": {"type": "worker", "index": index}})
    os.environ["TF_USE_LEGACY_KERAS"] = "1"


class _MultiWorkerBackend(Backend):
    def on_start(self, worker_group, backend_config) -> None:
        import ray
        urls = worker_group.execute(compat.worker_url)
        ray.get([worker_group.execute_single_async(i, _set_tf_config, worker_addresses=urls, index=i)
                 for i in range(len(worker_group))])


@dataclass
class MultiWorkerConfig(BackendConfig):
    @property
    def backend_cls(self):
        return _MultiWorkerBackend

    @property
    def framework(self):
        return compat.tensorflow_framework()
