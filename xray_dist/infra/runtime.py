"""Connecting to Ray the same way from the CLI, the jobs and the tests.

Address resolution: the ``--address`` flag, else ``RAY_ADDRESS`` (set by ``ray job submit`` for
the job's driver), else a fresh embedded instance (``ray.init(address="local")``). A bare
``ray.init()`` is never used: it would attach to whatever ``/tmp/ray/ray_current_cluster`` names,
even a cluster that died long ago.
"""

from __future__ import annotations

import logging
import os

from xray_dist.infra import console, worker_output
from xray_dist.infra.locations import public_env

log = logging.getLogger(__name__)

#: Environment every Ray worker gets: Keras 2 (tf-keras) for MultiWorkerMirroredStrategy support
#: (Keras 3's model.fit fails under it, keras-team/keras#20585), quiet TensorFlow logs, and Ray
#: Train's controller polling its workers every 0.5 s instead of 2 s: it collects each epoch's
#: report (and a finished worker) only when it polls, which cost ~2 s per epoch and per start/stop
#: of every sweep trial (measured with bench/run.py).
#: Sweep trials that train in their own process (xray_dist.training.inprocess) stop within a batch when ASHA
#: stops them; Tune's default 2 s wait for that before reusing the process is raised as a margin
#: for a loaded machine (when it runs out, Tune fails the next trial instead of starting a process).
WORKER_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
              "TUNE_FUNCTION_THREAD_TIMEOUT_S": "60"}


def worker_env() -> dict[str, str]:
    """The variables every Ray worker of a command gets, the same for the job (``init_ray``) and for
    Ray Train's workers: :data:`WORKER_ENV` (TensorFlow's log level as verbose as this process has
    it, never quieter than errors) and the
    object store's public settings. One set for both matters: Ray keeps a separate pool of worker
    processes per environment, and Train workers with another set than the job's (the object
    store's endpoint, say) had their Ray Data tasks start new processes where idle ones stood."""
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    try:  # as verbose as this process asks, never quieter than WORKER_ENV's (TensorFlow's errors are kept)
        level = str(min(int(os.environ["TF_CPP_MIN_LOG_LEVEL"]), int(WORKER_ENV["TF_CPP_MIN_LOG_LEVEL"])))
    except ValueError:
        level = WORKER_ENV["TF_CPP_MIN_LOG_LEVEL"]
    return {**WORKER_ENV, "TF_CPP_MIN_LOG_LEVEL": level, **public_env()}


def resolve_address(address: str | None) -> str:
    return address or os.environ.get("RAY_ADDRESS") or "local"


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Start or join Ray (idempotent: reuses a connection this process already has)."""
    import ray  # Ray: heavy; imported when a command starts or joins it

    env = worker_env()
    if ray.is_initialized():
        if console.active():  # a command run inside a program that started Ray itself
            worker_output.route_worker_output()
        return ray
    addr = resolve_address(address)
    if addr not in ("local", "auto") and "://" not in addr:
        # Ray's own helpers inside the job (Ray Train's placement-group cleaner queries the state
        # API) otherwise pick "the latest cluster" when a machine runs two, find the controller
        # missing there, and remove a live run's placement group.
        env["RAY_ADDRESS"] = addr
    # every worker masks the values pydicom's warnings quote (a name, a UID) before Ray logs them
    hook = f"{worker_output.__name__}.{worker_output.mask_pydicom_warnings.__name__}"
    kwargs = {"runtime_env": {"env_vars": env, "worker_process_setup_hook": hook}, "log_to_driver": True}
    if addr == "local":
        kwargs["num_cpus"] = num_cpus
        kwargs["include_dashboard"] = False
        # No dashboard, so Ray's state API has nothing of this instance to query. Left to find one
        # itself, it finds any other Ray instance on the machine: Ray Train's placement-group
        # cleaner then asks that one about this run's controller, is told it does not exist, and
        # removes the live run's placement group (seen: the demo killed while a test cluster ran).
        # An address where nothing listens makes the query fail, which the cleaner tolerates.
        env["RAY_API_SERVER_ADDRESS"] = "http://127.0.0.1:9"
    if console.active():
        console.adopt_ray_loggers()  # Ray's own start-up lines (token mode, "Started a local Ray instance"): the log
    log.debug("ray.init(address=%r)", addr)
    ray.init(address=addr, **kwargs)
    if console.active():
        worker_output.route_worker_output()
    return ray
