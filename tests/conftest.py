"""Shared fixtures: real DICOM files, one Ray runtime per test session, one prepared cache, one
real S3 server.

Ray is started once for the whole session as a two-node ``ray.cluster_utils.Cluster`` (2 logical CPUs
each, like two small machines, each with its own Ray temporary directory), so prepare, training and
sweep tests all run on real Ray without paying for several starts.

The S3 server is moto in server mode (a real S3 API over HTTP on 127.0.0.1), started before Ray
so that every Ray process inherits the same ``AWS_ENDPOINT_URL`` and test credentials: the product
sees object storage only through those variables, as it would see AWS or MinIO.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
if "XRAY_DIST_LOG_DIR" not in os.environ:  # commands' log files: the session's own place, not ~/.cache
    import tempfile

    os.environ["XRAY_DIST_LOG_DIR"] = tempfile.mkdtemp(prefix="xray_dist_logs_")
if "XRAY_DIST_SECRETS_DIR" not in os.environ:  # the per-user default salt: the session's own, not ~/.config
    import tempfile

    os.environ["XRAY_DIST_SECRETS_DIR"] = tempfile.mkdtemp(prefix="xray_dist_secrets_")

from xray_dist.data.synth import synthesize  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """The session's moto S3 server: its endpoint, the secret it was given, and a boto3 client."""

    def __init__(self, endpoint: str, secret: str):
        import boto3

        self.endpoint, self.secret = endpoint, secret
        self.client = boto3.client("s3", endpoint_url=endpoint)

    def bucket(self, name: str) -> str:
        """A new bucket, created with the S3 API; returns ``s3://name``."""
        self.client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for p in pages for o in p.get("Contents", []))

    def get(self, bucket: str, key: str) -> bytes:
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def upload_dir(self, local: Path, bucket: str, prefix: str) -> None:
        for f in sorted(Path(local).rglob("*")):
            if f.is_file():
                self.client.put_object(Bucket=bucket, Key=f"{prefix}/{f.relative_to(local).as_posix()}",
                                       Body=f.read_bytes())


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 (a free port), configured through the AWS variables only."""
    import secrets
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from moto_s3 import start_moto

    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    try:
        proc, endpoint = start_moto(log)
    except RuntimeError as e:
        pytest.fail(f"{e} (see {log.name})")
    secret = "xds-" + secrets.token_hex(12)
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "xray-dist-test",
                       "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1"})
    yield S3Server(endpoint, secret)
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def worker_node_temp_dir():
    """The Ray temporary directory of the cluster's second node (not the head's ``/tmp/ray``)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="rw", dir="/tmp"))  # Ray's socket paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(s3_server, worker_node_temp_dir):
    """A real two-node Ray cluster on this machine (head + one worker node, 2 logical CPUs each).

    The nodes share no Ray directory: the worker node has its own temporary directory, as a second
    machine would."""
    import ray
    from ray.cluster_utils import Cluster

    Path("/tmp/ray").mkdir(exist_ok=True)  # Cluster writes the head's address file there
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": 400 * 1024**2,
                        "resources": {"node_head": 1}},
    )
    cluster.add_node(num_cpus=2, object_store_memory=400 * 1024**2, resources={"node_worker": 1},
                     temp_dir=str(worker_node_temp_dir))
    cluster.wait_for_nodes()
    from xray_dist.infra.runtime import worker_env

    # RAY_ADDRESS for Ray's own helpers in workers: the job-submission test runs a second cluster.
    # worker_env(), as the commands' own ray.init: Train's workers then share the job's process pool.
    ray.init(address=cluster.address, runtime_env={"env_vars": {**worker_env(), "RAY_ADDRESS": cluster.address}})
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
    from xray_dist.data.prepare import prepare

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
    from xray_dist.training.driver import train

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


def elements_wider_than(page: Path, width: int = 1280) -> list[str]:
    """Open a copy of ``page`` in headless Chromium ``width`` px wide; the elements (tag.class and
    their right edge) that reach past the window's right edge, or a page that scrolls sideways."""
    import re
    import shutil
    import subprocess

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("XRAY_DIST_REQUIRE_BROWSER"):
            pytest.fail("Chromium is required (XRAY_DIST_REQUIRE_BROWSER is set) but not installed")
        pytest.skip("Chromium not installed (apt-get install chromium)")
    probe = page.with_name(page.stem + "-width-probe.html")
    probe.write_text(page.read_text().replace("</body>", """<script>
window.addEventListener('load', () => {
  const w = document.documentElement.clientWidth, bad = [];
  if (document.documentElement.scrollWidth > w) bad.push('page scrolls sideways:' + document.documentElement.scrollWidth);
  for (const e of document.body.querySelectorAll('*')) {
    const r = e.getBoundingClientRect();
    if (r.width && r.right > w + 0.5) bad.push(e.tagName.toLowerCase() + '.' + e.className + ':' + Math.round(r.right));
  }
  document.body.setAttribute('data-wide', bad.length ? bad.slice(0, 20).join('|') : 'none');
});</script></body>"""))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={width},2000",
             "--virtual-time-budget=5000", "--dump-dom"]
    dom = subprocess.run([exe, *flags, probe.resolve().as_uri()], capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'data-wide="([^"]*)"', dom)
    assert m, "the width probe did not run"
    return [] if m.group(1) == "none" else m.group(1).split("|")


@pytest.fixture
def wider_than():
    """:func:`elements_wider_than` for tests that check a report fits a page."""
    return elements_wider_than


@pytest.fixture
def chromium():
    """:func:`render_in_chromium` for tests that check a page in a real browser."""
    return render_in_chromium


def h5_arrays(path) -> dict:
    """Every array of an HDF5 weights file, by its path inside the file."""
    import h5py

    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def assert_same_run(a: tuple, b: tuple) -> None:
    """Two runs given as (weights by name, history rows) trained the same: same per-epoch losses and
    validation numbers, same weights (float tolerance)."""
    import numpy as np

    (wa, ha), (wb, hb) = a, b
    assert [int(h["epoch"]) for h in ha] == [int(h["epoch"]) for h in hb]
    for key in ("loss", "val_loss", "val_auc_abnormal"):
        np.testing.assert_allclose([float(h[key]) for h in hb], [float(h[key]) for h in ha], rtol=1e-5, atol=1e-6,
                                   err_msg=key)
    assert sorted(wa) == sorted(wb)
    for name in wa:
        np.testing.assert_allclose(wb[name], wa[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.fixture
def read_h5():
    """:func:`h5_arrays`, for tests that compare weights files."""
    return h5_arrays


@pytest.fixture
def same_run():
    """:func:`assert_same_run` for tests that compare an interrupted run with an uninterrupted one."""
    return assert_same_run


def mlflow_skinny_command(exe: str) -> str | None:
    """Why ``exe`` cannot serve the tracking tests when it is the ``mlflow`` command of the
    mlflow-skinny client (the training environment's: ``pip install xray-dist[mlflow]``), else None.

    mlflow-skinny 3.x still lists ``mlflow server`` (``--help`` prints the full server's usage), but
    it ships without the server's UI and dependencies, so the server it starts, if any, is not the
    one the tests mean; older skinny releases answer ``No such command 'server'``. The executable's
    own interpreter (its ``#!`` line) says which distribution it belongs to."""
    import subprocess

    why = (f"`{exe}` is mlflow-skinny's client command, not an MLflow tracking server: install the full "
           "`mlflow` package in its own environment and set XRAY_DIST_MLFLOW_SERVER to its `mlflow` (.ci/run "
           "makes one)")
    try:
        first = Path(exe).read_bytes()[:512].split(b"\n", 1)[0].decode()
    except (OSError, UnicodeDecodeError):
        first = ""
    python = first[2:].strip().split()[0] if first.startswith("#!") and first[2:].strip() else ""
    if python and Path(python).is_file():
        probe = ("import importlib.metadata as m, sys\n"
                 "def has(d):\n    try:\n        m.distribution(d)\n        return True\n"
                 "    except m.PackageNotFoundError:\n        return False\n"
                 "sys.stdout.write('skinny' if has('mlflow-skinny') and not has('mlflow') else 'full')")
        r = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
        if r.stdout == "skinny":
            return why
        if r.stdout == "full":
            return None
    # no interpreter to ask (a wrapper script, a frozen binary): ask the command itself
    r = subprocess.run([exe, "server", "--help"], capture_output=True, text=True, timeout=120)
    return None if r.returncode == 0 and "Usage: mlflow server" in r.stdout else why


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (SQLite backend, artifacts served by it), run
    from its own environment (``XRAY_DIST_MLFLOW_SERVER``: its ``mlflow`` executable; .ci/run
    makes one). Returns the tracking URI."""
    import shutil
    import subprocess
    import time
    import urllib.request

    def unavailable(why: str):
        if os.environ.get("XRAY_DIST_REQUIRE_MLFLOW"):
            pytest.fail(f"an MLflow server is required (XRAY_DIST_REQUIRE_MLFLOW is set) but {why}")
        pytest.skip(why)

    exe = os.environ.get("XRAY_DIST_MLFLOW_SERVER") or shutil.which("mlflow")
    if not exe:
        unavailable("no MLflow server: set XRAY_DIST_MLFLOW_SERVER to an `mlflow` executable (.ci/run installs one)")
    skinny = mlflow_skinny_command(exe)
    if skinny:
        unavailable(skinny)
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(d / "server.log", "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUAL_ENV"))}
    proc = subprocess.Popen([exe, "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db", "--artifacts-destination",
                             str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the MLflow server did not start (see {d / 'server.log'})")
        time.sleep(1)
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
