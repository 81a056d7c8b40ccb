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

    # RAY_ADDRESS for Ray's own helpers in workers: the job-submission test runs a second cluster
    ray.init(address=cluster.address, runtime_env={"env_vars": {**WORKER_ENV, "RAY_ADDRESS": cluster.address}})
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


@pytest.fixture(scope="session")
def two_worker_run(ray_cluster, prepared_binary, tmp_path_factory):
    """A real 2-worker training run (one worker per node, 4 epochs, all blocks trainable, 32 px):
    (TrainResult, cache, run directory). Shared by the training tests and the results tests
    (explain, report, export) so the suite trains it once."""
    from xray_dist.config import TrainConfig
    from xray_dist.train import train

    _, cache = prepared_binary
    out = tmp_path_factory.mktemp("run2w")
    # STRICT_SPREAD: one worker on each node, each leaving CPU for Ray Data on its node.
    res = train(TrainConfig(cache=str(cache), out=str(out), epochs=4, batch_size=8, lr=1e-4, weights="none",
                            unfreeze_blocks=5, num_workers=2, cpus_per_worker=0.5, placement_strategy="STRICT_SPREAD"))
    return res, cache, out


def render_in_chromium(page: Path, screenshot: Path) -> str:
    """Open ``page`` in headless Chromium; return the ``data-images`` mark the page's script sets
    once loaded ("decoded/total") and write a screenshot. Fails when Chromium is missing."""
    import shutil
    import subprocess

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("XRAY_DIST_REQUIRE_BROWSER"):
            pytest.fail("Chromium is required (XRAY_DIST_REQUIRE_BROWSER is set) but not installed")
        pytest.skip("Chromium not installed (apt-get install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files"]
    dom = subprocess.run([exe, *flags, "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    subprocess.run([exe, *flags, "--window-size=1200,2400", f"--screenshot={screenshot}", page.resolve().as_uri()],
                   capture_output=True, timeout=120)
    import re

    m = re.search(r'data-images="([^"]*)"', dom)
    return m.group(1) if m else ""


@pytest.fixture
def chromium():
    """:func:`render_in_chromium` for tests that check a page in a real browser."""
    return render_in_chromium
