"""A trained model's directory (``RUN/model/``), the artifact ``predict``, ``explain``, ``evaluate``,
``export`` and ``report`` read: its files, its spec, loading it (a full model, or a sweep trial's
trained top rebuilt on its frozen base), and predicting on arrays. No other module joins paths
into a model directory.

Layout (``RUN/model/``, or ``model.v<id>/`` behind a ``model.current`` pointer after a re-export to
object storage: :func:`run_model_dir`)::

    weights.h5          the full model's weights (:data:`FULL_WEIGHTS`)
    top_weights.h5      a features-trained trial's top only (:data:`TOP_WEIGHTS`), with
                        ``model_spec.json``'s ``"top"`` entry naming the base it sits on
    model_spec.json     architecture, class scheme, preprocessing spec, thresholds (:data:`SPEC_FILE`)

Reading the layout and the spec needs no TensorFlow; building a model imports
:mod:`xray_dist.model.network` (and TensorFlow) in the functions that do it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from xray_dist.config import PreprocessSpec
from xray_dist.data.classes import ClassScheme
from xray_dist.model import calibration
from xray_dist.errors import ModelSpecError
from xray_dist.infra import storage
from xray_dist.model.precision import keras_policy

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import tf_keras as keras

    from xray_dist.model.network import ModelSpec

#: A run's model directory: ``RUN/model/``.
MODEL_DIR = "model"
#: The full model's weights.
FULL_WEIGHTS = "weights.h5"
#: A features-trained model directory may hold only its trained top (the head: kilobytes at unfreeze
#: depth 0; with block 5 at depth 1, 28 of VGG16's 59 MB) and ``model_spec.json``'s ``"top"`` entry
#: naming the frozen base it sits on; :func:`full_model_from_top` rebuilds the full model from the two.
TOP_WEIGHTS = "top_weights.h5"
SPEC_FILE = "model_spec.json"


def save_spec(directory: str | Path, spec: ModelSpec, extra: dict) -> None:
    """Write ``DIR/model_spec.json``: the architecture (``"model"``) and ``extra`` (class scheme,
    preprocessing spec, thresholds, a trained top's base)."""
    storage.write_json(storage.join(directory, SPEC_FILE), {"model": spec.to_dict(), **extra}, indent=2)


def read_spec(directory: str | Path) -> dict:
    """``DIR/model_spec.json`` of a model directory (local or URI)."""
    try:
        return storage.read_json(storage.join(directory, SPEC_FILE))
    except (FileNotFoundError, IsADirectoryError):
        raise ModelSpecError(f"{directory}: no {SPEC_FILE}; is it a run or model directory from xray-dist "
                             "train?") from None


def spec_thresholds(spec: dict) -> tuple[float, dict[str, float]]:
    """A model's thresholds from its spec, both chosen on validation: the abnormal score's (0.5 when
    none was stored), and (multi-label) each finding's, by key."""
    return float(spec.get("threshold", 0.5)), {k: float(v) for k, v in spec.get("thresholds", {}).items()}


def spec_temperature(spec: dict, scheme: ClassScheme) -> float | list[float] | None:
    """A model's calibration temperature from its spec (:mod:`xray_dist.model.calibration`): one
    number, or (multi-label) one per finding in ``scheme``'s order; None when not calibrated."""
    t = spec.get("calibration", {}).get("temperature")
    if isinstance(t, dict):
        return [float(t.get(k, 1.0)) for k in scheme.keys]
    return None if t is None else float(t)


def run_model_dir(run: str | Path) -> str:
    """A run's model directory (``RUN/model/``, or the version its pointer names after a re-export to
    object storage), whether or not it holds a model."""
    return storage.current_dir(storage.join(run, MODEL_DIR))


def read_run_spec(run: str | Path) -> dict | None:
    """The ``model_spec.json`` of a run's model directory (local or URI); None when there is none."""
    try:
        return storage.read_json(storage.join(run_model_dir(run), SPEC_FILE))
    except (FileNotFoundError, IsADirectoryError):
        return None


def _h5_logits_shape(path: Path) -> tuple | None:
    import h5py  # heavy: only when weights are loaded

    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        if "logits" not in root:
            return None
        found = []
        root["logits"].visititems(lambda n, o: found.append(o.shape) if n.endswith("kernel:0") else None)
        return tuple(found[0]) if found else None


def load_weights_checked(model: keras.Model, path: str | Path) -> None:
    """Load full-model weights; a file whose logits differ fails naming both shapes."""
    path = Path(path)
    want = tuple(model.get_layer("logits").kernel.shape)
    have = _h5_logits_shape(path)
    if have is not None and have != want:
        raise ModelSpecError(f"{path}: its logits kernel has shape {have}, but this model's logits need {want} "
                             "(a different number of classes or head width)")
    try:
        model.load_weights(str(path))
    except ValueError as e:
        raise ModelSpecError(f"{path}: does not fit this model: {e}") from None


def full_model_from_top(model_dir: str | Path) -> keras.Model:
    """The full model of a directory holding only :data:`TOP_WEIGHTS`: the same frozen base as its
    features came from (the ``"top"`` entry: base weights and seed), with the trained top copied in."""
    # TensorFlow: only when a model is built (reading a spec or a directory's layout needs none)
    import tf_keras as keras

    from xray_dist.model.network import ModelSpec, build_model, build_top_model, transfer_top_weights

    model_dir = Path(model_dir)
    saved = read_spec(model_dir)
    if "top" not in saved or not (model_dir / TOP_WEIGHTS).is_file():
        raise ModelSpecError(f"{model_dir}: neither {FULL_WEIGHTS} nor {TOP_WEIGHTS} with its base; "
                             "is it a finished `xray-dist train` run or sweep trial?")
    spec, top_info = ModelSpec.from_dict(saved["model"]), saved["top"]
    pinned = top_info.get("weights_sha256")
    if pinned:
        try:
            now = storage.content_sha256(top_info["weights"])
        except FileNotFoundError:
            now = None
        if now != pinned:
            raise ModelSpecError(
                f"{model_dir}: its frozen base is {top_info['weights']}, whose content "
                + ("is gone" if now is None else f"changed since the trial was trained (sha256 {pinned[:12]}… then, "
                                                 f"{now[:12]}… now)")
                + "; rebuilding on it would give another model. Restore that file, or retrain")
    top = build_top_model(spec, tuple(top_info["features_shape"]))
    top.load_weights(str(model_dir / TOP_WEIGHTS))
    keras.utils.set_random_seed(int(top_info["seed"]))  # weights="none": the base the features came from
    full = build_model(spec, top_info["weights"])
    transfer_top_weights(top, full)
    return full


def materialize_full_model(model_dir: str | Path) -> Path:
    """Write :data:`FULL_WEIGHTS` for a top-only model directory (no-op when it is there already)."""
    dest = Path(model_dir) / FULL_WEIGHTS
    if not dest.is_file():
        tmp = dest.with_name(".writing_" + FULL_WEIGHTS)
        full_model_from_top(model_dir).save_weights(str(tmp))
        tmp.rename(dest)
    return dest


@dataclass
class LoadedModel:
    model: object
    scheme: ClassScheme
    preprocess: PreprocessSpec
    threshold: float
    spec: dict = field(default_factory=dict)  # the model directory's model_spec.json
    precision: str = "float32"  # what it computes in (xray_dist.model.precision); its weights are float32

    @property
    def thresholds(self) -> dict[str, float]:
        """Multi-label: each finding's threshold (by key), chosen on validation."""
        return spec_thresholds(self.spec)[1]

    @property
    def temperature(self) -> float | list[float] | None:
        """The temperature ``xray-dist calibrate`` fitted (per finding in the scheme's order), or None."""
        return spec_temperature(self.spec, self.scheme)


def model_dir_of(run: str | Path) -> str:
    """The ``model/`` directory of a run (local path or URI), or ``run`` itself when it is one."""
    sub = run_model_dir(run)
    model_dir = sub if storage.is_file(storage.join(sub, SPEC_FILE)) else storage.current_dir(
        storage.absolute(run))
    if not any(storage.is_file(storage.join(model_dir, w)) for w in (FULL_WEIGHTS, TOP_WEIGHTS)):
        raise ModelSpecError(f"{run}: no exported model (model/{FULL_WEIGHTS}); is it a finished `xray-dist train` "
                             "run?")
    return model_dir


def load_run_model(run: str | Path, precision: str = "float32") -> LoadedModel:
    """The exported model of a run directory (or of its ``model/`` directory), local or a URI,
    built to compute in ``precision`` (auto, float32 or bfloat16, for inference: see
    :mod:`xray_dist.model.precision`); its float32 weights are loaded as they are."""
    from xray_dist.model.network import ModelSpec, build_model  # TensorFlow: only when a model is loaded

    storage.check_location(run)
    with storage.local_copy(model_dir_of(run)) as model_dir, keras_policy(precision) as chosen:
        spec = read_spec(model_dir)
        if (model_dir / FULL_WEIGHTS).is_file():
            model = build_model(ModelSpec.from_dict(spec["model"]), weights="none")
            load_weights_checked(model, model_dir / FULL_WEIGHTS)
        else:  # a sweep trial's compact export: rebuilt on its base
            model = full_model_from_top(model_dir)
    log.debug("the model computes in %s (%s); its weights are float32", chosen.name, chosen.why)
    return LoadedModel(model, ClassScheme.from_dict(spec["classes"]), PreprocessSpec.from_dict(spec["preprocess"]),
                       spec_thresholds(spec)[0], spec, chosen.name)


def run_preprocess(run: str | Path) -> PreprocessSpec:
    """How a run's model reads files (its spec's preprocessing), without loading the model; a
    location that cannot work fails here, as :func:`load_run_model` would."""
    storage.check_location(run)
    return PreprocessSpec.from_dict(read_spec(model_dir_of(run))["preprocess"])


def ready_scorer(model) -> None:
    """Compile ``model``'s forward pass (:func:`~xray_dist.model.network.scorer`) now, before its
    first batch (the part that is Python: tracing; it overlaps with decoding files)."""
    from xray_dist.model.network import scorer  # TensorFlow: a model is loaded already

    scorer(model).trace()


def predict_arrays(lm: LoadedModel, images: np.ndarray, batch_size: int = 32, calibrated: bool = True) -> np.ndarray:
    """``(n, K)`` probabilities: of each class, or (multi-label) of each finding; at the model's
    calibration temperature when it has one (``calibrated=False``: as the network gives them)."""
    from xray_dist.model.network import scorer  # TensorFlow: a model is loaded already

    run = scorer(lm.model)
    outs = [run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    probs = lm.scheme.probabilities(np.concatenate(outs)) if outs else np.zeros((0, lm.scheme.num_classes))
    if calibrated and lm.temperature is not None and len(probs):
        return calibration.apply(probs, lm.temperature, lm.scheme.multilabel)
    return probs
