"""Private hooks into pinned dependencies, each in one place, with the version it was written for
and the public alternative (or why there is none).

Ray 2.60.0 (``ray[train,tune]==2.60.0`` in pyproject.toml)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

RAY_VERSION = "2.60.0"

#: Credentials Ray Tune would copy from the driver into every trial's runtime environment.
_SECRET_ENV = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"})


def stop_tune_forwarding_credentials() -> None:
    """Ray Tune copies a list of the driver's variables into each trial's ``runtime_env``
    (``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``), the AWS credentials among them,
    and Ray's runtime-env agent logs that environment in plain text (``runtime_env_agent.log`` on
    every node that runs a trial). Trials get credentials as Ray Train's workers do — from the
    node's own environment or instance profile — so the credentials are taken off that list (the
    access key ID too: a key ID without its secret is botocore's "partial credentials" error).
    There is no public switch for the list in Ray 2.60; if the private name moves, the sweep's
    S3 test (which scans every node's Ray logs for the secret) fails."""
    import ray

    try:
        from ray.tune.execution import class_cache
    except ImportError:  # pragma: no cover - a Ray without the module forwards nothing this way
        log.warning("Ray %s has no ray.tune.execution.class_cache (written for %s): check that trials do not "
                    "receive the driver's AWS credentials", ray.__version__, RAY_VERSION)
        return
    if ray.__version__ != RAY_VERSION:
        log.warning("compat.stop_tune_forwarding_credentials was written for Ray %s, this is %s", RAY_VERSION,
                    ray.__version__)
    class_cache.ENV_VARS_TO_PROPAGATE = set(class_cache.ENV_VARS_TO_PROPAGATE) - _SECRET_ENV
