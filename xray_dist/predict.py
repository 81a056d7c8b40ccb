"""``predict``: DICOM files → class probabilities with a trained run's exported model.

The run's ``model/model_spec.json`` carries the architecture, the class scheme and the
preprocessing spec, so files are read exactly as the cache was made. A file that cannot be read
gets a row with its error; the others go on.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray_dist.classes import ClassScheme
from xray_dist.config import PreprocessSpec
from xray_dist.errors import DicomReadError, ModelSpecError

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: object
    scheme: ClassScheme
    preprocess: PreprocessSpec
    threshold: float


def load_run_model(run: str | Path) -> LoadedModel:
    """The exported model of a run directory (or of its ``model/`` directory)."""
    from xray_dist.model import (FULL_WEIGHTS, TOP_WEIGHTS, ModelSpec, build_model, full_model_from_top,
                                 load_weights_checked, read_spec)

    run = Path(run)
    model_dir = run / "model" if (run / "model").is_dir() else run
    if not (model_dir / FULL_WEIGHTS).is_file() and not (model_dir / TOP_WEIGHTS).is_file():
        raise ModelSpecError(f"{run}: no exported model (model/{FULL_WEIGHTS}); is it a finished `xray-dist train` "
                             "run?")
    spec = read_spec(model_dir)
    if (model_dir / FULL_WEIGHTS).is_file():
        model = build_model(ModelSpec.from_dict(spec["model"]), weights="none")
        load_weights_checked(model, model_dir / FULL_WEIGHTS)
    else:  # a sweep trial's compact export: rebuilt on its base
        model = full_model_from_top(model_dir)
    return LoadedModel(model, ClassScheme.from_dict(spec["classes"]), PreprocessSpec.from_dict(spec["preprocess"]),
                       float(spec.get("threshold", 0.5)))


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; directories become their files (recursively, sorted, hidden ones skipped)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not any(s.startswith(".") for s in f.parts)
                          and f.suffix.lower() not in {".csv", ".json", ".txt", ".png", ".npy"})
        else:
            out.append(p)
    return out


def predict_arrays(lm: LoadedModel, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    from xray_dist.metrics import class_probabilities

    outs = [np.asarray(lm.model(images[i : i + batch_size], training=False)) for i in range(0, len(images), batch_size)]
    return class_probabilities(np.concatenate(outs)) if outs else np.zeros((0, lm.scheme.num_classes))


def load_inputs(files: list[Path], spec: PreprocessSpec, what: str) -> tuple[list[str], list[tuple[int, np.ndarray]]]:
    """Every file read as the model sees it: per file its error (``kind: reason``, empty when read)
    and the ``(index, image)`` of each readable one. A bad file is logged and the rest go on."""
    from xray_dist.dicom import load_image

    errors: list[str] = []
    good: list[tuple[int, np.ndarray]] = []
    for i, f in enumerate(files):
        try:
            good.append((i, load_image(f, spec)))
            errors.append("")
        except DicomReadError as e:
            errors.append(f"{e.kind}: {e.reason}")
            log.warning("%s: %s", what, e)
    return errors, good


def predict_files(run: str | Path, inputs: list[str], out_csv: str | Path, batch_size: int = 32) -> list[dict]:
    """Write ``out_csv`` (path, prediction, p_<class>..., abnormal score, error) and return its rows."""
    lm = load_run_model(run)
    files = expand_inputs(inputs)
    errors, good = load_inputs(files, lm.preprocess, "predict")
    rows = [{"path": str(f), "prediction": "", "error": err} for f, err in zip(files, errors)]
    names = list(lm.scheme.names)
    if good:
        probs = predict_arrays(lm, np.stack([img for _, img in good]), batch_size)
        for (i, _), p in zip(good, probs):
            rows[i]["prediction"] = names[int(np.argmax(p))]
            rows[i].update({f"p_{n}": float(v) for n, v in zip(names, p)})
            rows[i]["abnormal_score"] = float(1.0 - p[0])
            rows[i]["abnormal_at_threshold"] = bool(1.0 - p[0] >= lm.threshold)
    fields = ["path", "prediction", *[f"p_{n}" for n in names], "abnormal_score", "abnormal_at_threshold", "error"]
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return rows
