"""A checkpoint's training state beside its weights, and the digest that proves the workers agree.

:func:`save_training_state` writes what the next epoch needs besides the weights — Adam's moments
and step counter, and each dropout generator's state — so that, with the (seed, epoch) order of
:class:`~xray_dist.training.pipeline.ShardCache`, a resumed run trains what the uninterrupted run
would.
:func:`weights_digest` hashes the trainable weights: after each epoch every rank compares its
digest with rank 0's (:mod:`xray_dist.training.callbacks`).

The models are passed in; nothing here imports TensorFlow.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from xray_dist.errors import CacheError, XrayDistError
from xray_dist.infra import compat

OPTIMIZER_STATE = "optimizer.npz"
RNG_STATE = "rng.npz"


def save_training_state(model, directory: Path) -> None:
    """What the next epoch needs beside the weights: Adam's moments and step counter
    (``optimizer.npz``, in the optimizer's variable order) and each dropout generator's state
    (``rng.npz``). Together with the epoch in ``state.json`` and the (seed, epoch) order of
    :class:`~xray_dist.training.pipeline.ShardCache`, a run resumed from this checkpoint trains
    what the uninterrupted run would."""
    np.savez(directory / OPTIMIZER_STATE, *[np.asarray(v.numpy()) for v in model.optimizer.variables])
    np.savez(directory / RNG_STATE, **{name: g.state.numpy() for name, g in compat.dropout_generators(model).items()})


def restore_training_state(model, directory: Path, strategy) -> bool:
    """Load :func:`save_training_state`'s files into a compiled model (built in ``strategy``'s
    scope); False when the checkpoint has none (written before xray-dist kept them)."""
    if not (directory / OPTIMIZER_STATE).exists():
        return False
    opt = model.optimizer
    with strategy.scope():
        getattr(opt, "inner_optimizer", opt).build(model.trainable_variables)
    with np.load(directory / OPTIMIZER_STATE) as f:
        values = [f[f"arr_{i}"] for i in range(len(f.files))]
    variables = list(opt.variables)
    if len(values) != len(variables) or any(tuple(v.shape) != a.shape for v, a in zip(variables, values)):
        raise CacheError(f"{directory}: the checkpoint's optimizer state ({len(values)} arrays) does not fit this "
                         f"model's optimizer ({len(variables)} variables); resume with the run's own settings")
    for v, a in zip(variables, values):
        v.assign(a)
    gens = compat.dropout_generators(model)
    with np.load(directory / RNG_STATE) as f:
        for name in f.files:
            if name in gens:
                gens[name].state.assign(f[name])
    return True


def weights_digest(model, strategy) -> str:
    """sha256 (hex) of the model's trainable weights, their bytes in the model's order. Every local
    copy of a mirrored variable must hold the same bytes (an :class:`XrayDistError` otherwise)."""
    h = hashlib.sha256()
    for v in model.trainable_weights:
        # mixed precision wraps each variable (AutoCastVariable); its copies are the wrapped one's
        copies = [np.asarray(c.numpy()) for c in strategy.experimental_local_results(getattr(v, "_variable", v))]
        if any(c.tobytes() != copies[0].tobytes() for c in copies[1:]):
            raise XrayDistError(f"the {len(copies)} local copies of {v.name} differ: the replicas of this worker are "
                                "out of sync")
        h.update(copies[0].tobytes())
    return h.hexdigest()
