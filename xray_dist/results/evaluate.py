"""``evaluate``: the numbers to report — a trained model scored once on a split that took part in
no choice (``test`` by default), with patient-level confidence intervals.

Every choice of a run or sweep is made on validation: the best epoch, the best trial, the
threshold (Youden's J). Their validation scores are therefore optimistic. ``evaluate`` scores the
held-out split with the threshold stored with the model, and resamples *patients* for its 95 %
intervals (:func:`xray_dist.results.metrics.cluster_bootstrap_ci`).

Refused (exit 2): the train split; a split with no images; a cache whose splits or labels differ
from those the model was trained with (its fingerprint, ``RUN/inputs.json`` or
``SWEEP/inputs.json``); a cache decoded with other preprocessing than the model's; a sweep that
another command (``tune``, another ``evaluate``) holds — a sweep is evaluated under its lock, since
its ``best.json`` is rewritten. ``--split val`` is allowed and marked optimistic.

Writes ``OUT/metrics.json`` (every metric as ``{"value", "ci95"}``), ``OUT/scores.parquet`` (one
row per image: the cache's name for it, patient key, label, probabilities), ``OUT/roc.png`` and
``OUT/reliability.png``; with ``--by``, ``metrics.json``'s ``subgroups``, ``OUT/subgroups.csv`` and the
forest plot ``OUT/subgroups.png`` (:mod:`xray_dist.results.subgroups`). ``OUT`` defaults to ``MODEL/evaluation/<split>``, where ``report`` finds
it; evaluating a sweep evaluates its best trial and adds the test score to ``best.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from xray_dist.data import fingerprint
from xray_dist.data.cache import load_manifest, load_spec, load_split_arrays, split_labels
from xray_dist.data.classes import ClassScheme, abnormal_score, abnormal_truth
from xray_dist.data.subgroups import ATTRIBUTES, UNKNOWN
from xray_dist.errors import CacheError, XrayDistError
from xray_dist.infra import storage
from xray_dist.infra.locks import TargetLock
from xray_dist.model import calibration
from xray_dist.model.artifacts import LoadedModel, load_run_model, predict_arrays
from xray_dist.results import runs
from xray_dist.results.metrics import Resampling, auroc, calibration_curves, metrics_with_intervals, reliability
from xray_dist.results.subgroups import CSV_COLUMNS, MIN_PATIENTS, csv_rows, subgroup_metrics

log = logging.getLogger(__name__)

#: The file every reader trusts (written last): the metrics with their intervals.
METRICS = "metrics.json"
#: The split name of an external cache's evaluation (every image of a cache the model never saw).
EXTERNAL = "external"
#: ``--by``'s table: one row per attribute, subgroup and metric.
SUBGROUPS_CSV = "subgroups.csv"


def resolve_target(model: str) -> tuple[str, str | None]:
    """``(run, sweep)``: the run to score, and the sweep it is the best trial of (None for a run)."""
    model = storage.absolute(model)
    best = runs.read_best(model)
    if best is not None:
        return best["model"], model
    if runs.is_sweep(model):
        raise XrayDistError(f"{model}: this sweep has no best.json (no trial completed); nothing to evaluate")
    return model, None


def check_cache(target: str, cache: str) -> dict:
    """The cache's fingerprint, after checking it is the one ``target`` (run or sweep) was made from."""
    fp = fingerprint.of_cache(cache)
    recorded = fingerprint.recorded(target)
    if recorded is None:
        raise CacheError(f"{target} records no cache fingerprint (inputs.json), so the splits it was trained with "
                         "cannot be checked; evaluate needs a run or sweep made by this version")
    diff = fingerprint.changes(recorded, fp)
    if diff:
        raise CacheError(f"--cache {cache} is not the cache {target} was trained with: " + "; ".join(diff)
                         + ". Its test images may have been training or validation images; evaluate on the cache "
                           "the model was trained with")
    return fp


@dataclass(frozen=True)
class Subgroups:
    """``evaluate --by``: the attributes to break the numbers down by, and the fewest patients a
    subgroup needs for its numbers."""

    by: tuple[str, ...] = ()
    min_patients: int = MIN_PATIENTS

    def __post_init__(self):
        unknown = [a for a in self.by if a not in ATTRIBUTES]
        if unknown:
            raise XrayDistError(f"--by {','.join(unknown)}: expected some of {','.join(ATTRIBUTES)}")
        if self.min_patients < 1:
            raise XrayDistError(f"--min-patients {self.min_patients}: expected 1 or more")


def evaluate_model(model: str, cache: str, split: str = "test", out: str | None = None, n_boot: int = 1000,
                   batch_size: int = 32, subgroups: Subgroups = Subgroups(), external: bool = False,
                   precision: str = "auto") -> dict:
    """Score ``split`` of ``cache`` with ``model`` (a run, or a sweep's best trial); returns metrics.json.
    ``external``: ``cache`` is another one, the model never saw (another hospital): every image of it
    is scored, the output marked external.

    A sweep is evaluated under its lock (:class:`~xray_dist.infra.locks.TargetLock`): while ``tune`` or
    another ``evaluate`` holds it, this one stops at once with :class:`~xray_dist.errors.LockedError`
    and ``best.json`` is left as it was."""
    split = EXTERNAL if external else split
    if split == "train":
        raise XrayDistError("--split train: the model was fitted on it; evaluate a split that took part in no choice "
                            "(test), or val (optimistic: the epoch, trial and threshold were chosen on it)")
    if split not in ("test", "val", EXTERNAL):
        raise XrayDistError(f"--split {split!r}: expected test or val (or --external for another cache)")
    for where in (model, cache, *([out] if out else [])):
        storage.check_location(where)
    run, sweep = resolve_target(model)
    job = _Job(cache, split, out, n_boot, batch_size, subgroups, precision)
    if sweep is None:
        return _evaluate(run, None, job)
    # the sweep's best.json (and, by default, its evaluation/) are rewritten: one writer per sweep, as tune
    with TargetLock(sweep, "xray-dist evaluate"):
        run, sweep = resolve_target(model)  # its best trial as it stands under the lock
        return _evaluate(run, sweep, job)


@dataclass(frozen=True)
class _Job:
    """What one ``evaluate`` was asked for."""

    cache: str
    split: str
    out: str | None
    n_boot: int
    batch_size: int
    subgroups: Subgroups
    precision: str = "auto"  # what the model computes in (xray_dist.model.precision)


@dataclass(frozen=True)
class _Split:
    """One split of the cache as the model scores it: the cache's name for each image, its
    patient key, its target (class index, or multi-label target row) and its manifest label."""

    paths: list[str]
    images: np.ndarray
    labels: np.ndarray
    patients: np.ndarray
    label_text: list[str]
    attributes: dict[str, np.ndarray]  # subgroup attribute -> each image's value ("unknown" where none)


def _checked_model(run: str, sweep: str | None, cache: str, split: str,
                   precision: str = "auto") -> tuple[LoadedModel, dict]:
    """The run's model and the cache's fingerprint, after checking that the cache is the one the
    model was trained with (an external cache: that it is not), decoded the same way, and that
    ``split`` has images."""
    if split == EXTERNAL:
        fp = fingerprint.of_cache(cache)
        if fp["id"] == (fingerprint.recorded(sweep or run) or {}).get("id"):
            raise CacheError(f"--external: {cache} is the cache the model was trained with; evaluate its test split "
                             "without --external")
    else:
        if split not in load_manifest(cache).column("split").to_pylist():
            raise CacheError(f"--cache {cache}: the {split!r} split has no images; prepare with --test-fraction or "
                             "--split-file to hold patients out")
        fp = check_cache(sweep or run, cache)
    lm = load_run_model(run, precision)
    ours, theirs = load_spec(cache).to_dict(), lm.preprocess.to_dict()
    diff = [f"{k} {ours.get(k)!r} (the model's: {theirs.get(k)!r})" for k in sorted(set(ours) | set(theirs))
            if ours.get(k) != theirs.get(k)]
    if diff:
        raise CacheError(f"--cache {cache} was decoded with other preprocessing than the model's: " + "; ".join(diff)
                         + ". Prepare it with the model's settings")
    return lm, fp


def _overlap(target: str, patients: np.ndarray) -> dict:
    """An external cache's patients against the training cache's: how many keys are in both."""
    note = ("patient keys are salted: they match only where both caches were prepared with the same salt, so 0 "
            "proves nothing across salts")
    try:
        trained = set(load_manifest(fingerprint.recorded_cache(target)).column("patient").to_pylist())
    except (XrayDistError, TypeError, OSError):
        return {"patients_in_training_cache": None, "note": "the training cache is not where the run recorded it; "
                "overlap not checked"}
    return {"patients_in_training_cache": len(set(patients.tolist()) & trained), "note": note}


def _read_split(cache: str, split: str, scheme: ClassScheme) -> _Split:
    which = None if split == EXTERNAL else split  # an external cache: every image
    label_of = split_labels(cache, which, scheme)  # an empty split, or a class the model lacks: CacheError
    paths, images = load_split_arrays(cache, which)
    m = load_manifest(cache)
    patient_of = dict(zip(m.column("path").to_pylist(), m.column("patient").to_pylist()))
    label_text = dict(zip(m.column("path").to_pylist(), m.column("label").to_pylist()))
    row_of = {p: i for i, p in enumerate(m.column("path").to_pylist())}
    attributes = {}
    for a in ATTRIBUTES:  # a cache prepared before attributes were recorded: all unknown
        col = m.column(a).to_pylist() if a in m.column_names else [UNKNOWN] * m.num_rows
        attributes[a] = np.array([col[row_of[p]] or UNKNOWN for p in paths], dtype=object)
    return _Split(paths=list(paths), images=images,
                  labels=np.array([label_of[p] for p in paths], dtype=int),  # multi-label: target rows
                  patients=np.array([patient_of[p] for p in paths]), label_text=[label_text[p] for p in paths],
                  attributes=attributes)


def _evaluate(run: str, sweep: str | None, job: _Job) -> dict:
    """:func:`evaluate_model`'s work on ``run`` (a sweep's best trial: under the sweep's lock)."""
    cache, split, out, n_boot = storage.absolute(job.cache), job.split, job.out, job.n_boot
    lm, fp = _checked_model(run, sweep, cache, split, job.precision)
    data = _read_split(cache, split, lm.scheme)
    raw = predict_arrays(lm, data.images, job.batch_size, calibrated=False)
    probs = raw if lm.temperature is None else calibration.apply(raw, lm.temperature, lm.scheme.multilabel)
    names = list(lm.scheme.names)
    values, method = metrics_with_intervals(data.labels, probs, names, lm.threshold,
                                            Resampling(data.patients, n_boot), multilabel=lm.scheme.multilabel,
                                            thresholds=lm.thresholds)
    metrics = {
        "split": split, "optimistic": split == "val", "external": split == EXTERNAL, "precision": lm.precision,
        "images": int(len(data.labels)), "patients": int(len(set(data.patients.tolist()))),
        "threshold": lm.threshold, "threshold_chosen_on": "validation (Youden's J)",
        "interval_method": method,
        **{k: {"value": v[0], "ci95": [v[1], v[2]]} for k, v in values.items()},
        "classes": names, "model": run, "sweep": sweep, "cache_fingerprint": fp["id"],
        "task": "multilabel" if lm.scheme.multilabel else "multiclass",
    }
    if lm.scheme.multilabel:
        metrics["thresholds"] = lm.thresholds
        metrics["keys"] = lm.scheme.keys
        metrics["abnormal_score"] = "any finding vs none, scored by the largest finding probability"
    if lm.temperature is not None:
        metrics["calibration"] = _calibration_metrics(lm, data, raw, probs, n_boot)
    if job.subgroups.by:
        metrics["subgroups"] = subgroup_metrics({a: data.attributes[a] for a in job.subgroups.by}, data.labels, probs,
                                                data.patients, list(lm.scheme.keys), lm.threshold,
                                                lm.scheme.multilabel, n_boot, min_patients=job.subgroups.min_patients)
        metrics["subgroup_method"] = (f"the same {n_boot} patient resamples for every subgroup; a gap is the best "
                                      "minus the worst subgroup by the point estimate, its interval from those "
                                      f"resamples; subgroups under {job.subgroups.min_patients} patients: no numbers")
    if split == EXTERNAL:
        metrics["overlap"] = _overlap(sweep or run, data.patients)
        metrics["training_cache_fingerprint"] = (fingerprint.recorded(sweep or run) or {}).get("id")
    if split == "val":
        metrics["note"] = ("validation chose the epoch, the trial and the threshold: these numbers are optimistic; "
                           "report a held-out test split")
    out = out or runs.evaluation_dir(sweep or run, f"{EXTERNAL}-{fp['id'][:8]}" if split == EXTERNAL else split)
    with storage.staged_output(out, marker=METRICS) as local:
        _write(local, metrics, data, probs, lm.scheme, raw if lm.temperature is not None else None)
    if sweep and split == "test":
        best = runs.read_best(sweep)
        best["test"] = {k: metrics[k] for k in ("auc_abnormal", "sensitivity", "specificity", "images", "patients",
                                                "interval_method")}
        runs.write_best(sweep, best)
    log.debug("evaluate: %s split, %d images of %d patients: AUROC abnormal %.3f [%.3f, %.3f]", split,
              metrics["images"], metrics["patients"], *values["auc_abnormal"])
    return {**metrics, "out": out}


def _calibration_metrics(lm: LoadedModel, data: _Split, raw: np.ndarray, probs: np.ndarray, n_boot: int) -> dict:
    """ECE (of the abnormal score) and Brier score before and after the model's temperature, each
    with its patient-level interval; and the abnormal AUROC of both, which calibration keeps."""
    ml = lm.scheme.multilabel
    truth = abnormal_truth(data.labels, ml)
    rows = np.arange(len(truth))
    resampling = Resampling(data.patients, n_boot)
    strata = (truth == 1).astype(int)

    def ece(p):
        def stat(r):
            r = r.astype(int)
            y, s = truth[r], abnormal_score(p[r], ml)
            return reliability(y[y >= 0], s[y >= 0])["ece"]
        return stat

    def brier_of(p):
        return lambda r: calibration.brier(p[r.astype(int)], data.labels[r.astype(int)], ml)

    out = {"temperature": lm.spec["calibration"]["temperature"], "fitted_on": "validation"}
    for name, stat in (("ece", ece), ("brier", brier_of)):
        for when, p in (("before", raw), ("after", probs)):
            v = resampling.interval(stat(p), (rows,), strata, strata)
            out[f"{name}_{when}"] = {"value": v[0], "ci95": [v[1], v[2]]}
    known = truth >= 0
    out["auc_abnormal_before"] = auroc(truth[known], abnormal_score(raw, ml)[known])
    return out


def _write(out: Path, metrics: dict, data: _Split, probs: np.ndarray, scheme: ClassScheme,
           raw: np.ndarray | None = None) -> None:
    """``scores.parquet``, ``roc.png``, ``reliability.png``, then :data:`METRICS` (standard JSON: a
    NaN is written as null)."""
    from xray_dist.results.plots import plot_calibration, plot_forest, plot_roc  # matplotlib: only when plotting

    names = list(scheme.names)
    table = pa.table({"path": data.paths, "patient": data.patients.tolist(),
                      "label": data.label_text if scheme.multilabel else [names[i] for i in data.labels],
                      **{f"p_{k}": probs[:, i] for i, k in enumerate(scheme.keys)}})
    storage.write_parquet(table, out / "scores.parquet")
    split = metrics["split"]
    intervals = {"abnormal": metrics["auc_abnormal"]["ci95"]}
    intervals.update({k: metrics[f"auc_{k}"]["ci95"] for k in scheme.keys if f"auc_{k}" in metrics})
    plot_roc(data.labels, probs, names, out / "roc.png", intervals, multilabel=scheme.multilabel)
    curves = calibration_curves(data.labels, probs, names, multilabel=scheme.multilabel, top_label=False)
    shown = {f"{name}, {split}" + (", calibrated" if raw is not None else ""): c for name, c in curves.items()}
    if raw is not None:  # the reliability diagram shows the model before and after its temperature
        before = calibration_curves(data.labels, raw, names, multilabel=scheme.multilabel, top_label=False)
        shown.update({f"{name}, {split}, uncalibrated": c for name, c in before.items()})
    plot_calibration(shown, out / "reliability.png")
    if "subgroups" in metrics:
        storage.write_csv(out / SUBGROUPS_CSV, csv_rows(metrics["subgroups"]), CSV_COLUMNS)
        plot_forest(metrics["subgroups"], out / "subgroups.png")
    storage.write_json(out / METRICS, metrics, indent=2)


def read_evaluation(target: str, split: str = "test") -> dict | None:
    """``TARGET/evaluation/<split>/metrics.json`` when ``evaluate`` has written it (standard JSON: a
    value that was NaN reads back as None)."""
    try:
        return storage.read_json(storage.join(runs.evaluation_dir(target, split), METRICS))
    except FileNotFoundError:
        return None


def read_external_evaluations(target: str) -> list[dict]:
    """Every external evaluation of ``target`` (``evaluation/external-<cache>/metrics.json``)."""
    root = storage.join(target, runs.EVALUATION)
    if not storage.is_dir(root):
        return []
    names = sorted({e.rel.split("/")[0] for e in storage.list_files(root)
                    if e.rel.startswith(f"{EXTERNAL}-") and e.rel.endswith(f"/{METRICS}")})
    return [m for m in (read_evaluation(target, n) for n in names) if m]
