"""Shared fixtures: real DICOM files, one Ray runtime per test session, one prepared cache.

Ray is started once for the whole session as a two-node ``ray.cluster_utils.Cluster`` (2 logical CPUs
each, like two small machines), so prepare, training and sweep tests all run on real Ray
without paying for several starts.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

from xray_dist.synth import synthesize  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real two-node Ray cluster on this machine (head + one worker node, 2 logical CPUs each)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": 400 * 1024**2,
                        "resources": {"node_head": 1}},
    )
    cluster.add_node(num_cpus=2, object_store_memory=400 * 1024**2, resources={"node_worker": 1})
    cluster.wait_for_nodes()
    from xray_dist.runtime import WORKER_ENV

    ray.init(address=cluster.address, runtime_env={"env_vars": dict(WORKER_ENV)})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def synth_binary(tmp_path_factory):
    """40 patients × 2 images, normal vs finding, all encodings, 96 px."""
    return synthesize(tmp_path_factory.mktemp("synth_binary"), patients=40, images_per_patient=2, size=96, seed=1)


@pytest.fixture(scope="session")
def prepared_binary(ray_cluster, synth_binary, tmp_path_factory):
    """The binary synthetic set prepared at 32 px into a cache (report, cache path)."""
    from xray_dist.config import PrepareConfig, PreprocessSpec
    from xray_dist.dataset import prepare

    cache = tmp_path_factory.mktemp("cache_binary")
    report = prepare(PrepareConfig(data_dir=str(synth_binary.out), labels=str(synth_binary.labels_csv),
                                   out=str(cache), preprocess=PreprocessSpec(image_size=32), seed=3))
    return report, cache
