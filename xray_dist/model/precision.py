"""Which number format a model computes in: ``--precision auto|float32|bfloat16``.

Weights are always float32 variables (Keras mixed precision keeps them so and casts per layer), so
a model trained or run in bfloat16 is saved, resumed and exported as float32 weights; only the
arithmetic differs. The logits layer computes in float32 in every policy.

``auto``:

- on a GPU, what xray-dist always did: training in ``mixed_bfloat16`` (compute capability 8+) or
  ``mixed_float16``; inference in float32;
- on a CPU with bfloat16 instructions (``amx_bf16`` or ``avx512_bf16`` among the CPU flags),
  ``mixed_bfloat16`` for inference (frozen-feature extraction, predict, explain, evaluate) and for
  training: measured on a 2-core Xeon with AMX (bench/, BENCHMARKS.md), VGG16 trains 1.6x faster at
  64 px and 4.4x at 224 px, extracts 3.2x faster, and the learning curve holds;
- on any other CPU, float32 (bfloat16 there is emulated: slower, not faster).

``bfloat16`` asks for it everywhere (on a CPU without the instructions it is correct but slow, and
the log says so); ``float32`` turns it off.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: The largest difference in any probability that bfloat16 inference may show against float32 on the
#: same images: bfloat16 keeps 8 significant bits (a relative step of 2^-8 = 0.4 % per operation),
#: and 0.02 is well under the gap that changes a reading (BENCHMARKS.md measured 0.0025 on VGG16).
#: export's check holds a bfloat16 serving model to it, and the benchmark's agreement figures.
AGREEMENT = 0.02
#: ... and a float32 serving model to this: the same arithmetic, a different graph.
SAME_ARITHMETIC = 1e-5

#: The CPU flags whose presence makes bfloat16 fast, best first.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_flag(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The first of :data:`BF16_FLAGS` this CPU has (read from ``cpuinfo``), or None."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:  # not Linux: no flags to read, so no claim
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            flags.update(line.split(":", 1)[1].split())
    return next((f for f in BF16_FLAGS if f in flags), None)


@dataclass(frozen=True)
class Resolved:
    """What a precision setting means on this machine: the Keras policy, its short name, and why."""

    policy: str  # float32 | mixed_bfloat16 | mixed_float16
    why: str

    @property
    def name(self) -> str:
        """``float32``, ``bfloat16`` or ``float16``: what metrics.json and the log say."""
        return self.policy.removeprefix("mixed_")


def _gpu_major() -> int | None:
    import tensorflow as tf  # TensorFlow: only where a model is built

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    return int(tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (7, 0))[0])


def resolve(precision: str, training: bool, gpu_major: int | None | bool = False,
            cpu_flag: str | None | bool = False) -> Resolved:
    """The policy for ``precision`` (auto, float32 or bfloat16) when ``training`` or running inference.

    ``gpu_major`` (the first GPU's compute capability major, None without GPUs) and ``cpu_flag``
    (see :func:`cpu_bf16_flag`) are read from this machine unless given."""
    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"precision must be auto, float32 or bfloat16. Received: precision={precision!r}")
    if precision == "float32":
        return Resolved("float32", "asked for (--precision float32)")
    if gpu_major is False:
        gpu_major = _gpu_major()
    if cpu_flag is False:
        cpu_flag = cpu_bf16_flag()
    if precision == "bfloat16":
        if gpu_major is None and cpu_flag is None:
            return Resolved("mixed_bfloat16", "asked for (--precision bfloat16); this CPU has no bfloat16 "
                                              "instructions (amx_bf16/avx512_bf16), so it is emulated and slow")
        return Resolved("mixed_bfloat16", "asked for (--precision bfloat16)")
    if gpu_major is not None:
        if not training:
            return Resolved("float32", "auto: inference on a GPU")
        return (Resolved("mixed_bfloat16", f"auto: GPU compute capability {gpu_major}.x trains in bfloat16")
                if gpu_major >= 8 else
                Resolved("mixed_float16", f"auto: GPU compute capability {gpu_major}.x trains in float16"))
    if cpu_flag:
        return Resolved("mixed_bfloat16", f"auto: this CPU has {cpu_flag}")
    return Resolved("float32", "auto: this CPU has no bfloat16 instructions (amx_bf16/avx512_bf16)")


def concrete(precision: str) -> str:
    """``float32`` or ``bfloat16``: what ``precision`` resolves to here for inference, for keys that
    must name the arithmetic (frozen features) and for passing on to other processes."""
    return resolve(precision, training=False).name


@contextlib.contextmanager
def keras_policy(precision: str, training: bool = False):
    """Build models inside this block in ``precision``'s policy (the layers keep it); the global
    policy is put back after. Yields the :class:`Resolved` policy."""
    import tf_keras as keras  # TensorFlow: only where a model is built

    chosen = resolve(precision, training)
    before = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(chosen.policy)
    try:
        yield chosen
    finally:
        keras.mixed_precision.set_global_policy(before)
