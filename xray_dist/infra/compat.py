"""Every use of a private API of a pinned dependency, in one place.

Each function names what it reaches into, the version it was written for, and the public
alternative (or why there is none). The installed Ray is checked against the pin when this module
is imported — a different Ray may have moved any of these names — so a mismatch is one clear
error, not a confusing failure deep inside a run. tf_keras is pinned alongside TensorFlow.

Ray 2.60.0 (``ray[train,tune,default]==2.60.0`` in pyproject.toml).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from importlib import metadata

from xray_dist.errors import XrayDistError

log = logging.getLogger(__name__)

RAY_VERSION = "2.60.0"
#: Set to 1 to run on another Ray anyway (at your own risk: the hooks below may have moved).
ALLOW_ENV = "XRAY_DIST_ALLOW_RAY_VERSION"


class CompatError(XrayDistError, ImportError):
    """The installed Ray is not the one xray-dist pins."""


def check_ray_version(installed: str | None = None) -> None:
    """Refuse a Ray other than :data:`RAY_VERSION` (read from the package metadata: Ray is not imported)."""
    if installed is None:
        try:
            installed = metadata.version("ray")
        except metadata.PackageNotFoundError:
            raise CompatError("Ray is not installed; xray-dist needs ray[train,tune,default]==" + RAY_VERSION) from None
    if installed != RAY_VERSION and os.environ.get(ALLOW_ENV) != "1":
        raise CompatError(f"xray-dist needs Ray {RAY_VERSION} (ray[train,tune,default]=={RAY_VERSION}, as pinned in "
                          f"pyproject.toml); this environment has Ray {installed}. Install the pinned version, or set "
                          f"{ALLOW_ENV}=1 to try anyway")


check_ray_version()


# ---- Ray Tune ------------------------------------------------------------------------------------

#: Credentials Ray Tune would copy from the driver into every trial's runtime environment.
_SECRET_ENV = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"})


def stop_tune_forwarding_credentials() -> None:
    """Ray Tune copies a list of the driver's variables into each trial's ``runtime_env``
    (``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``), the AWS credentials among them,
    and Ray's runtime-env agent logs that environment in plain text (``runtime_env_agent.log`` on
    every node that runs a trial). Trials get credentials as Ray Train's workers do — from the
    node's own environment or instance profile — so the credentials are taken off that list (the
    access key ID too: a key ID without its secret is botocore's "partial credentials" error).

    Public alternative: none; Ray 2.60 has no switch for the list. If the private name moves, the
    sweep's S3 test (which scans every node's Ray logs for the secret) fails."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = set(class_cache.ENV_VARS_TO_PROPAGATE) - _SECRET_ENV


def trial_stop_requested() -> bool:
    """Whether Tune has asked the calling trial's thread to end (ASHA stopped the trial).

    Reads ``ray.train._internal.session.get_session().stop_event``. Tune sets the event when it
    stops a trial but looks at it only at the thread's next report; reading it lets an in-process
    trial stop mid-epoch. Public alternative: none (``ray.tune.report`` raises only at the next report)."""
    from ray.train._internal.session import get_session

    session = get_session()
    return bool(session is not None and session.stop_event.is_set())


def autoscaler_max_resources() -> dict | None:
    """The most resources the cluster's autoscaler may start; None on a fixed cluster.

    ``ray._private.state.state.get_max_resources_from_cluster_config`` is what Ray Train's own
    scaling uses. Public alternative: none (``ray.cluster_resources`` is only what is up now)."""
    from ray._private.state import state

    read = state.get_max_resources_from_cluster_config  # a rename fails here, loudly
    try:
        return read()
    except (RuntimeError, ValueError, KeyError):  # no autoscaler config published: a fixed cluster
        return None


# ---- Ray Train -----------------------------------------------------------------------------------

def worker_url() -> str:
    """``host:port`` free on the calling Ray Train worker, for ``TF_CONFIG``.

    ``ray.train._internal.utils.get_address_and_port`` and ``ray._common.network_utils.build_address``
    are what Ray's own ``TensorflowConfig`` backend uses. Public alternative: importing
    ``ray.train.tensorflow``, whose ``__init__`` imports TensorFlow in every process that unpickles
    the config (:mod:`xray_dist.training.backend` says why that is avoided)."""
    from ray._common.network_utils import build_address
    from ray.train._internal.utils import get_address_and_port

    return build_address(*get_address_and_port())


def tensorflow_framework():
    """Train V2's tag for a TensorFlow backend (``ray.train.v2._internal.util.TrainingFramework``),
    which a custom ``BackendConfig`` must return. Public alternative: none in Ray 2.60."""
    from ray.train.v2._internal.util import TrainingFramework

    return TrainingFramework.TENSORFLOW


# ---- Ray's driver and workers ----------------------------------------------------------------------

def stdstream_dispatcher():
    """The object that hands the worker output Ray forwards to the driver to its printers
    (``ray._private.worker.global_worker_stdstream_dispatcher``), or None.

    Public alternative: ``ray.init(log_to_driver=False)``, which drops the output instead of routing
    it to the log file."""
    from ray._private import worker as ray_worker

    return getattr(ray_worker, "global_worker_stdstream_dispatcher", None)


#: The name of Ray's own printer among the dispatcher's handlers.
_RAY_PRINTER = "ray_print_logs"


def replace_worker_printer(name: str, handler) -> tuple | None:
    """Hand the worker output Ray forwards to this driver to ``handler`` (registered as ``name``)
    instead of Ray's printer. Returns Ray's printer ``(name, function)`` when it was in place (to
    give to :func:`restore_worker_printer`), else None (also when this Ray has no dispatcher to
    change: nothing done).

    Reads the dispatcher's ``handlers`` under its ``_lock``, as its own methods do. Public
    alternative: none that routes (see :func:`stdstream_dispatcher`)."""
    dispatcher = stdstream_dispatcher()
    if dispatcher is None or not hasattr(dispatcher, "remove_handler"):
        return None
    with dispatcher._lock:
        kept = [(n, h) for n, h in dispatcher.handlers if n == _RAY_PRINTER]
    dispatcher.remove_handler(_RAY_PRINTER)
    dispatcher.remove_handler(name)
    dispatcher.add_handler(name, handler)
    return kept[0] if kept else None


def restore_worker_printer(name: str, printer: tuple) -> None:
    """Undo :func:`replace_worker_printer`: the handler ``name`` off, Ray's ``printer`` back."""
    dispatcher = stdstream_dispatcher()
    dispatcher.remove_handler(name)
    dispatcher.add_handler(*printer)


def in_ray_worker() -> bool:
    """Whether this process is a Ray worker (``ray._private.worker.global_worker.mode``).
    Public alternative: ``ray.get_runtime_context().worker.mode`` reaches the same private object."""
    from ray._private import worker as ray_worker

    return getattr(ray_worker.global_worker, "mode", None) == ray_worker.WORKER_MODE


#: Trial statuses Tune runs again on resume (``resume_unfinished``): their ends will be reported.
_UNFINISHED = ("PENDING", "RUNNING", "PAUSED")


def resumable_grid(max_concurrent: int, recorded_trials, resume_errored: bool = False):
    """Tune's grid and random search (``BasicVariantGenerator``), whose restore agrees with the
    trials Tune restores (``recorded_trials()``: trial id → status in the experiment-state file
    Tune restores from, or None).

    Tune saves its trials (``experiment_state-*.json``) and this generator's state
    (``basic-variant-state-*.json``) side by side and uploads them to a bucket in parallel, in the
    background, so a driver killed mid-upload can leave one newer than the other. Restored as is,
    the generator may count a trial Tune recorded as finished among those running; with
    ``max_concurrent`` trials at a time it then never proposes the next one and Tune waits for it
    forever (``TuneController._update_trial_queue``); or it proposes again, under the same id, a
    trial Tune already has. After restoring, the generator's running trials are those Tune runs
    again, it skips every trial Tune already has, and its limit is this run's ``max_concurrent``
    (the saved state carries the old one). A trial it had proposed that Tune never recorded cannot
    be proposed again (its variant is spent): named in a warning, and missing from the results.
    Private API: the generator's ``_live_trials``, ``_iterators`` (``counter``), ``_uuid_prefix``.
    Public alternative: none (Tune restores the two files independently)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    again = _UNFINISHED + (("ERROR",) if resume_errored else ())

    class ResumableGrid(BasicVariantGenerator):
        def restore_from_dir(self, dirpath: str):
            limit = self.max_concurrent
            super().restore_from_dir(dirpath)
            self.max_concurrent = limit
            recorded = recorded_trials()
            if recorded is None or not self._iterators:
                return
            proposed = {f"{self._uuid_prefix}{i:05d}" for i in range(self._iterators[-1].counter)}
            lost = sorted(proposed - set(recorded))
            if lost:
                log.warning("tune: %d trial(s) the interrupted sweep had begun were never recorded in its state "
                            "(%s); they are not run again and are missing from results.csv", len(lost),
                            ", ".join(lost))
            self._live_trials = {i for i, status in recorded.items() if status in again}
            while not self.is_finished():  # past the trials Tune restored: never the same id twice
                if f"{self._uuid_prefix}{self._iterators[-1].counter:05d}" not in recorded:
                    break
                live, self.max_concurrent = set(self._live_trials), 0
                try:
                    self.next_trial()
                finally:
                    self.max_concurrent, self._live_trials = limit, live

    return ResumableGrid(max_concurrent=max_concurrent)


def replace_restored_search(tuner, search_alg) -> None:
    """Give a restored ``tune.Tuner`` this run's search algorithm: ``Tuner.restore`` takes the whole
    TuneConfig from the sweep's ``tuner.pkl`` (the search and its concurrency as the sweep began).
    Private API: ``Tuner._local_tuner._tune_config``. Public alternative: none (restore takes no
    TuneConfig)."""
    internal = tuner._local_tuner
    internal._tune_config = dataclasses.replace(internal._tune_config, search_alg=search_alg,
                                                max_concurrent_trials=None)


# ---- tf_keras ------------------------------------------------------------------------------------

def dropout_generators(model) -> dict:
    """Layer name → the ``tf.random.Generator`` behind each layer that draws random numbers
    (dropout), created now (in the caller's strategy scope, not inside the first train step).

    tf_keras 2.21 keeps it in ``layer._random_generator`` (a ``backend.RandomGenerator``) whose
    ``_maybe_init`` creates ``_generator``. Saving and restoring that state is what makes a resumed
    run bit-identical. Public alternative: none (Keras checkpoints do not hold it)."""
    gens = {}
    for layer in model.submodules:
        rng = getattr(layer, "_random_generator", None)
        if rng is not None and getattr(layer, "name", None):
            rng._maybe_init()
            if getattr(rng, "_generator", None) is not None:
                gens[layer.name] = rng._generator
    return gens
