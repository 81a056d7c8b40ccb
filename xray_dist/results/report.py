"""``report``: one self-contained HTML file for a training run or a sweep.

For a run (a directory written by ``xray-dist train``, or a sweep trial): model and dataset
summary, the held-out test numbers first when ``xray-dist evaluate`` has written them, validation
metrics (labelled as used for selection) with patient-level bootstrap 95 % confidence intervals
(AUROC abnormal vs negative and per class, sensitivity/specificity at the run's threshold; the
method is named on the page), training curves, ROC curves,
confusion matrix, calibration (expected calibration error and a reliability diagram). For a sweep
(``results.csv`` + ``best.json``): the results table, the metric against each dimension, then the
best trial's run report.

Everything comes from what the run already wrote (``metrics.json``, ``history.csv``,
``val_scores.npz``, ``model/model_spec.json``) and the cache's ``prepare_report.json``; no DICOM
header is read, so no identifying value can reach the page. Images are embedded as PNG data URIs.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from xray_dist.data import fingerprint
from xray_dist.data.cache import REPORT as PREPARE_REPORT, read_report
from xray_dist.data.classes import ClassScheme
from xray_dist.errors import XrayDistError
from xray_dist.infra import storage
from xray_dist.model.artifacts import read_run_spec, spec_thresholds
from xray_dist.results import model_card, runs
from xray_dist.results.evaluate import read_evaluation, read_external_evaluations
from xray_dist.results.metrics import Resampling, calibration_curves, confusion_matrix, metrics_with_intervals

N_BOOT = 1000


def _figure(data: bytes, alt: str, caption: str | None = None) -> str:
    """A PNG embedded as a data URI, with its caption (``alt`` unless given)."""
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (f'<figure><img alt="{html.escape(alt)}" src="{uri}">'
            f"<figcaption>{html.escape(alt if caption is None else caption)}</figcaption></figure>")


def _png(draw: Callable[[io.BytesIO], None], alt: str) -> str:
    buf = io.BytesIO()
    draw(buf)
    return _figure(buf.getvalue(), alt)


def _missing(v) -> bool:
    """No number: None (a NaN read back from standard JSON) or NaN."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def _fmt(v, digits: int = 3) -> str:
    if _missing(v):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.2e}" if v != 0 and abs(v) < 0.01 else f"{v:.{digits}f}"
    return html.escape(str(v))


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _ci(point, lo, hi) -> str:
    """A value with its 95 % interval; "n/a" without a value (None or NaN)."""
    if _missing(point):
        return "n/a"
    if _missing(lo) or _missing(hi):
        return f"{point:.3f} (interval undefined)"
    return f"{point:.3f} [{lo:.3f}, {hi:.3f}]"


def metric_rows(values: dict[str, tuple], scheme: ClassScheme, threshold: float, thresholds: dict[str, float],
                summary: list[list] = (), calibration: list[list] | None = None) -> list[list]:
    """The rows of a metrics table (held-out test or validation): the abnormal AUROC, each class's
    (one-vs-rest) or finding's AUROC (with its sensitivity / specificity at its threshold), then
    ``summary`` (e.g. the mean AUROC), sensitivity and specificity of the abnormal score at
    ``threshold``, accuracy, and ``calibration`` (default: the bootstrapped ECE).

    ``values`` maps :func:`~xray_dist.results.metrics.metrics_with_intervals`'s keys to
    ``(value, lo, hi)``; a key that is absent shows "n/a"."""
    def cell(k):
        return _ci(*values[k]) if k in values else "n/a"

    names = list(scheme.names)
    if scheme.multilabel:
        rows = [["AUROC any finding vs none (largest finding probability)", cell("auc_abnormal")]]
        for n, k in zip(names, scheme.keys):
            rows += [[f"AUROC {n}", cell(f"auc_{k}")],
                     [f"{n}: sensitivity / specificity at {thresholds.get(k, 0.5):.3f}",
                      f"{cell(f'sensitivity_{k}')} / {cell(f'specificity_{k}')}"]]
        rows += list(summary)
        rows += [[f"any finding: sensitivity at {threshold:.3f}", cell("sensitivity")],
                 [f"any finding: specificity at {threshold:.3f}", cell("specificity")],
                 ["accuracy (image x finding, at each finding's threshold)", cell("accuracy")]]
        ece = "expected calibration error (image x finding)"
    else:
        rows = [[f"AUROC abnormal vs {names[0] if names else 'negative'}", cell("auc_abnormal")]]
        rows += [[f"AUROC {n} vs rest", cell(f"auc_{n}")] for n in names[1:] if f"auc_{n}" in values]
        rows += list(summary)
        rows += [[f"sensitivity at {threshold:.3f}", cell("sensitivity")],
                 [f"specificity at {threshold:.3f}", cell("specificity")],
                 ["accuracy (argmax)", cell("accuracy")]]
        ece = "expected calibration error"
    return rows + (list(calibration) if calibration is not None else [[ece, cell("ece")]])


def _held_out_section(ev: dict) -> str:
    """The held-out test numbers (``xray-dist evaluate``): shown first, they are the ones to report."""
    scheme = ClassScheme(tuple(ev.get("classes", [])), multilabel=ev.get("task") == "multilabel")
    values = {k: (m["value"], *m["ci95"]) for k, m in ev.items() if isinstance(m, dict) and "value" in m}
    rows = metric_rows(values, scheme, ev["threshold"], ev.get("thresholds", {}))
    title = {"test": "Held-out test", "external": "External validation"}.get(ev["split"],
                                                                             f"Evaluation on {ev['split']} (optimistic)")
    return (f"<h2>{html.escape(title)}</h2><p>{ev['images']} images of {ev['patients']} patients that took part "
            f"in no choice; the threshold {ev['threshold']:.3f} is the model's, chosen on validation. Intervals: "
            f"{html.escape(ev['interval_method'])}.</p>" + _table(["metric", "value [95 % CI]"], rows, "metrics")
            + (_calibration_section(ev["calibration"]) if ev.get("calibration") else "")
            + (_subgroup_section(ev) if ev.get("subgroups") else ""))


def _calibration_section(c: dict) -> str:
    """``xray-dist calibrate``'s temperature on the held-out split: ECE and Brier before and after."""
    t = c["temperature"]
    shown = ", ".join(f"{k} {v:.3f}" for k, v in t.items()) if isinstance(t, dict) else f"{t:.3f}"
    rows = [[name, _ci(c[f"{k}_before"]["value"], *c[f"{k}_before"]["ci95"]),
             _ci(c[f"{k}_after"]["value"], *c[f"{k}_after"]["ci95"])]
            for name, k in (("expected calibration error", "ece"), ("Brier score", "brier"))]
    return (f"<h3>Calibration</h3><p>Temperature {html.escape(shown)}, fitted on validation; the probabilities above "
            "are calibrated (AUROC is unchanged by it).</p>"
            + _table(["metric", "uncalibrated [95 % CI]", "calibrated [95 % CI]"], rows, "metrics"))


def _external_section(internal: dict | None, external: list[dict]) -> str:
    """Internal (held-out test) and external results side by side, then each external one whole."""
    columns = ([("internal test", internal)] if internal else []) + [
        (f"external {e['cache_fingerprint'][:8]}", e) for e in external]
    keys = ["images", "patients", "auc_abnormal", "sensitivity", "specificity", "accuracy", "ece"]

    def cell(ev, k):
        v = ev.get(k)
        return _ci(v["value"], *v["ci95"]) if isinstance(v, dict) else v

    rows = [[k, *[cell(ev, k) for _, ev in columns]] for k in keys]
    overlap = [f"<li>{html.escape(name)}: {_fmt(ev.get('overlap', {}).get('patients_in_training_cache'))} patient "
               f"keys also in the training cache ({html.escape(ev.get('overlap', {}).get('note', ''))})</li>"
               for name, ev in columns if ev.get("external")]
    return ("<h2>Internal and external</h2><p>The same model on its own held-out patients and on caches it never "
            "saw (other sites), at its own threshold.</p>" + _table(["metric", *[n for n, _ in columns]], rows, "metrics")
            + f"<ul>{''.join(overlap)}</ul>" + "".join(_held_out_section(e) for e in external))


def _subgroup_section(ev: dict) -> str:
    """``evaluate --by``: a row per subgroup, the largest gap per attribute, and the forest plot."""
    from xray_dist.results.plots import plot_forest  # matplotlib: only when plotting

    def cell(g, k):
        return _ci(g[k]["value"], *g[k]["ci95"]) if k in g else g.get("skipped", "")

    rows, gaps = [], []
    for attr, res in ev["subgroups"].items():
        for g in res["groups"]:
            rows.append([attr, g["value"], g["patients"], g["images"], g["prevalence"], cell(g, "auc_abnormal"),
                         cell(g, "sensitivity"), cell(g, "specificity")])
        for m, gap in res["gaps"].items():
            gaps.append(f"<li>{html.escape(attr)}: {html.escape(m)} {html.escape(str(gap['between'][0]))} minus "
                        f"{html.escape(str(gap['between'][1]))}: {_ci(gap['value'], *gap['ci95'])}</li>")
    return ("<h3>By subgroup</h3><p>" + html.escape(ev.get("subgroup_method", "")) + ".</p>"
            + _table(["attribute", "subgroup", "patients", "images", "prevalence", "AUROC abnormal [95 % CI]",
                      "sensitivity", "specificity"], rows, "metrics")
            + (f"<p>Largest gaps (an interval that excludes 0 is a gap the data support):</p><ul>{''.join(gaps)}</ul>"
               if gaps else "")
            + _png(lambda buf: plot_forest(ev["subgroups"], buf), "AUROC abnormal by subgroup"))


@dataclass(frozen=True)
class _Run:
    """What a run wrote that its report shows (:mod:`xray_dist.results.runs`, its model's spec)."""

    path: str
    metrics: dict
    spec: dict
    history: list[dict]
    scores: runs.ValScores
    scheme: ClassScheme
    threshold: float
    thresholds: dict[str, float]

    @property
    def names(self) -> list[str]:
        return list(self.metrics["classes"])


def _load_run(run: str) -> _Run:
    metrics, history, scores = runs.read_metrics(run), runs.read_history(run), runs.read_val_scores(run)
    spec = read_run_spec(run) or {}
    scheme = ClassScheme.from_dict(spec["classes"]) if "classes" in spec else ClassScheme(tuple(metrics["classes"]))
    return _Run(run, metrics, spec, history, scores, scheme,
                threshold=float(spec.get("threshold", metrics.get("best", {}).get("threshold", 0.5))),
                thresholds=spec_thresholds(spec)[1])


def _settings_table(r: _Run) -> str:
    cfg, model, metrics = r.metrics.get("config", {}), r.spec.get("model", {}), r.metrics
    return _table(["setting", "value"], [
        ["findings (one sigmoid output each)" if r.scheme.multilabel else "classes", ", ".join(r.names)],
        ["image size", model.get("image_size", cfg.get("image_size"))],
        ["head width", model.get("head_width", cfg.get("head_width"))],
        ["unfreeze depth (VGG blocks trainable)", model.get("unfreeze_blocks", cfg.get("unfreeze_blocks"))],
        ["base weights", cfg.get("weights")],
        ["learning rate", cfg.get("lr")],
        ["epochs run / best epoch", f"{metrics.get('epochs')} / {metrics.get('best_epoch')}"],
        ["trainable parameters", metrics.get("trainable_parameters")],
        ["workers", cfg.get("num_workers")],
        ["wall time (s)", metrics.get("wall_seconds")],
    ], "kv")


def _validation_intro(r: _Run, method: str) -> str:
    """What the validation numbers are, and why they are optimistic."""
    ml, labels, patients = r.scheme.multilabel, r.scores.labels, r.scores.patients
    truth = r.scheme.abnormal_truth(labels)
    n_abn, n_neg = int((truth == 1).sum()), int((truth == 0).sum())
    n_pat = f" of {len(set(patients.tolist()))} patients" if patients is not None else ""
    negative = r.scheme.negative if ml else r.names[0]
    score_text = "the largest finding probability" if ml else f"1 − p({negative})"
    return (f"<h3>Validation metrics (used for selection)</h3><p>{len(labels)} validation images{n_pat} "
            f"({n_abn} abnormal, {n_neg} {html.escape(negative)}). Intervals: "
            f"{html.escape(method)}. These images chose the best epoch (and, in a sweep, the trial) and the "
            f"threshold {r.threshold:.3f} on the abnormal score ({html.escape(score_text)}, Youden's J)"
            + (", and each finding's threshold" if ml else "") + ", so "
            "every number here is optimistic; report the held-out test numbers (`xray-dist evaluate`).</p>")


def _figures(r: _Run, ci: dict, cal: dict) -> list[str]:
    """Training curves, then ROC curves, the confusion matrix (multi-class) and the reliability diagram."""
    from xray_dist.results.plots import plot_calibration, plot_confusion, plot_history, plot_roc  # matplotlib

    ml, names, labels, probs = r.scheme.multilabel, r.names, r.scores.labels, r.scores.probs
    intervals = {"abnormal": ci["auc_abnormal"][1:]}
    intervals.update({k: ci[f"auc_{k}"][1:] for k in (r.scheme.keys if ml else names[1:]) if f"auc_{k}" in ci})
    parts = []
    if r.history:  # wide: full width
        parts.append(_png(lambda b: plot_history(r.history, b), "Training curves"))
    parts.append('<div class="figs">')
    parts.append(_png(lambda b: plot_roc(labels, probs, names, b, intervals, multilabel=ml), "ROC curves (validation)"))
    if not ml:  # multi-label outputs are not exclusive: no confusion matrix
        cm = confusion_matrix(labels, np.argmax(probs, axis=1), len(names))
        parts.append(_png(lambda b: plot_confusion(cm, names, b), "Confusion matrix (validation, argmax)"))
    parts.append(_png(lambda b: plot_calibration(cal, b), "Reliability diagram (validation)"))
    parts.append("</div>")
    return parts


def _run_section(run: str, n_boot: int, file_lists: bool = True) -> str:
    """A run's page: settings, validation metrics with intervals, figures, dataset."""
    r = _load_run(run)
    s, ml = r.scores, r.scheme.multilabel
    ci, method = metrics_with_intervals(s.labels, s.probs, r.names, r.threshold, Resampling(s.patients, n_boot),
                                        multilabel=ml, thresholds=r.thresholds)
    cal = calibration_curves(s.labels, s.probs, r.names, multilabel=ml)
    summary = [["mean AUROC over findings" if ml else "macro AUROC", _fmt(r.metrics.get("val_auc"))]]
    rows = metric_rows(ci, r.scheme, r.threshold, r.thresholds, summary,
                       calibration=[[f"expected calibration error, {k}", _fmt(v["ece"])] for k, v in cal.items()])
    parts = [f"<h2>Run <code>{html.escape(storage.name(run))}</code></h2>", _settings_table(r),
             _validation_intro(r, method), _table(["metric", "value [95 % CI]"], rows, "metrics")]
    if any(v[1] == v[2] for v in ci.values()):
        parts.append(f"<p><em>A zero-width interval comes from a perfect score on these {len(s.labels)} images, "
                     "which every resample repeats; it is not certainty. Validate on more patients.</em></p>")
    parts += _figures(r, ci, cal)
    parts.append(_dataset_section(r.metrics.get("config", {}).get("cache"), r.metrics.get("dataset", {}), file_lists))
    return "\n".join(parts)


def _dataset_section(cache: str | None, summary: dict, file_lists: bool = True) -> str:
    """The dataset: counts and splits from the cache's prepare report (else the run's summary of
    it), and with ``file_lists`` every file that was not used."""
    report = {}
    if cache:
        try:
            report = read_report(cache)
        except XrayDistError:  # the cache's store is out of reach (a moved cache reads as {})
            report = {}
    src = report or summary
    if not src:
        return "<h3>Dataset</h3><p>No prepare report found (the cache has moved?).</p>"
    parts = ["<h3>Dataset</h3>"]

    def count(key):
        return len(src[key]) if isinstance(src.get(key), list) else src.get(key, 0)

    parts.append(_table(["", "count"], [["files found", src.get("found")], ["used", src.get("ok")],
                                        ["quarantined", count("quarantined")], ["excluded by view", count("excluded")]],
                        "kv"))
    splits = src.get("splits", {})
    parts.append(_table(["split", "images", "patients"],
                        [[k, v.get("images"), v.get("patients")] for k, v in splits.items()]))
    if src.get("split_fingerprint"):  # salt-free: two people compare their splits by this value
        seed = (src.get("split_settings") or {}).get("seed")
        parts.append(f"<p>Split fingerprint <code>{src['split_fingerprint']}</code>"
                     + (f" (seed {seed})" if seed is not None else "") + ": the same files, labels, split settings "
                     "and seed give the same value on any machine.</p>")
    parts.append(_table(["finding" if src.get("task") == "multilabel" else "label", "images"],
                        [[k, v] for k, v in sorted(src.get("classes", {}).items())]))
    if file_lists:
        parts += _unused_files(report)
    return "\n".join(parts)


def _unused_files(report: dict) -> list[str]:
    """The prepare report's lists of files that were not used, 200 of each at most."""
    parts = []
    for key, what in (("quarantined", "Quarantined files (unreadable; not used)"),
                      ("excluded", "Files of other views (--views; not used)"),
                      ("unlabeled", "Files without a label (not used)"),
                      ("missing", "Labelled paths with no file")):
        listed = report.get(key, [])
        if not listed:
            continue
        shown = listed[:200]
        parts.append(f"<h4>{what}: {len(listed)}</h4>")
        parts.append(_table(["file", "reason"], [[q.get("path"), q.get("reason", "")] if isinstance(q, dict)
                                                 else [q, ""] for q in shown]))
        if len(listed) > len(shown):
            parts.append(f"<p>… and {len(listed) - len(shown)} more in {PREPARE_REPORT}.</p>")
    return parts


#: The sweep table's columns (results.csv's names) and their short headings: the table fits a 1280 px
#: page, and scrolls inside its own box if a browser's fonts make it wider.
_SWEEP_COLUMNS = {"trial": "trial", "status": "status", "epochs": "epochs", "val_auc_abnormal": "val AUROC abnormal",
                  "val_auc": "val AUROC", "val_accuracy": "val accuracy", "sensitivity": "sens.", "specificity": "spec.",
                  "trainable_parameters": "trainable params", "wall_seconds": "seconds"}


def _sweep_section(sweep: str) -> tuple[str, str | None]:
    """The sweep's results table (best first), its plot and its best trial; and that trial's run."""
    rows = runs.read_results(sweep)
    best = runs.read_best(sweep)
    cols = [c for c in _SWEEP_COLUMNS if rows and c in rows[0]]

    def cell(r, c):
        v = r.get(c, "")
        try:
            return float(v) if c in ("lr", "val_auc_abnormal", "val_auc", "val_accuracy", "sensitivity",
                                     "specificity") else v
        except ValueError:
            return v

    # best first by the sweep's own objective (best.json's), as the sweep chose its best trial
    objective = best.get("objective", "val_auc_abnormal") if best else "val_auc_abnormal"
    objective = objective if rows and objective in rows[0] else "val_auc_abnormal"

    def rank(r):
        v = r.get(objective)
        return -float(v) if v not in ("", None) and not math.isnan(float(v)) else math.inf

    order = sorted(rows, key=rank)
    parts = [f"<h2>Sweep <code>{html.escape(storage.name(sweep))}</code></h2>",
             f"<p>{len(rows)} trials; {sum(r['status'] == 'completed' for r in rows)} completed, "
             f"{sum(r['status'] == 'stopped_early' for r in rows)} stopped early, "
             f"{sum(r['status'] == 'failed' for r in rows)} failed. Sorted by {html.escape(_SWEEP_COLUMNS.get(objective, objective))} "
             "(the sweep's objective), best first. "
             "Trials are named by their settings: W head width (0: no hidden layer), K classes, D VGG blocks "
             "trained, lr learning rate.</p>",
             '<div class="wide">' + _table([_SWEEP_COLUMNS[c] for c in cols], [[cell(r, c) for c in cols] for r in order],
                                           "results") + "</div>"]
    png = runs.read_sweep_plot(sweep)
    if png is not None:
        parts.append(_figure(png, "metric against each dimension",
                             "val_auc_abnormal against each searched dimension"))
    if not best:
        return "\n".join(parts), None
    parts.append("<h3>Best trial</h3>" + _table(["setting", "value"], [[k, v] for k, v in best["config"].items()],
                                                 "kv"))
    val = best.get("metrics", {}).get("val_auc_abnormal")
    test = best.get("test", {}).get("auc_abnormal")
    parts.append(f"<p>Validation AUROC abnormal {_fmt(val)}: the best of {len(rows)} trials on the same "
                 "validation images, so biased upward"
                 + (f"; held-out test AUROC abnormal {_ci(test['value'], *test['ci95'])}</p>" if test else
                    "; no held-out test score yet (`xray-dist evaluate --model SWEEP --cache CACHE`).</p>"))
    return "\n".join(parts), best["model"]


CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.8em 0;max-width:100%}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;overflow-wrap:anywhere}
.wide{max-width:100%;overflow-x:auto}
th{background:#f2f2f2}table.results td{font-variant-numeric:tabular-nums}
.figs{display:flex;flex-wrap:wrap;gap:1em}.figs figure{flex:1 1 45%;max-width:48%}figure{margin:.5em 0}img{max-width:100%}
figcaption{font-size:.85em;color:#555}code{background:#f5f5f5;padding:0 .2em}
"""

# Marks the page once every embedded image has decoded (a browser test reads it back).
SCRIPT = """
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute('data-images', ok + '/' + imgs.length);
});
"""


def write_report(target: str | Path, out: str | Path, n_boot: int = N_BOOT, shareable: bool = False,
                 intended_use: str | None = None) -> Path:
    """Write the HTML report for a run or sweep directory ``target`` (local or URI) to ``out``, and
    its model card (:mod:`xray_dist.results.model_card`) to ``MODEL_CARD.md`` beside it.

    ``shareable``: for places beyond this disk (an experiment tracker): no file names (the
    dataset's lists of unused files, the run's own path), which can carry a patient's name."""
    for where in (target, out):
        storage.check_location(where)
    target = storage.absolute(target)
    if runs.is_sweep(target):
        body, run = _sweep_section(target)
        if run is not None and runs.is_run(run):
            body += "\n" + _run_section(run, n_boot, not shareable)
        title = f"xray-dist sweep report: {storage.name(target)}"
    elif runs.is_run(target):
        body, run = _run_section(target, n_boot, not shareable), target
        title = f"xray-dist run report: {storage.name(target)}"
    else:
        raise XrayDistError(f"{target}: neither a run (metrics.json) nor a sweep (results.csv) directory")
    held_out, external = read_evaluation(target), read_external_evaluations(target)
    if run is not None and runs.is_run(run):
        card = model_card.build(runs.read_metrics(run), read_run_spec(run) or {}, held_out, external,
                                fingerprint.recorded(target), intended_use)
        model_card.write(card, storage.parent(storage.absolute(out)), "Model card")
        body += "\n" + card.html()
    if external:
        body = _external_section(held_out, external) + "\n" + body
    if held_out:  # the numbers to report come first; validation (used for selection) beneath
        body = _held_out_section(held_out) + "\n" + body
    source = "" if shareable else f" from <code>{html.escape(str(target))}</code>"
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style><script>{SCRIPT}</script></head><body><h1>{html.escape(title)}</h1>"
            f"<p>Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by xray-dist{source}.</p>{body}</body></html>")
    storage.write_text(out, page)  # whole or absent
    return out if storage.is_uri(out) else Path(out)
