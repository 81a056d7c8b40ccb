"""Subgroup performance (``evaluate --by``): does the model work for everyone?

For each attribute the cache's manifest holds (:mod:`xray_dist.data.subgroups`: sex, age band,
view, manufacturer, model, site) and each of its values: images, patients, prevalence, the
abnormal AUROC (and each finding's, for a multi-label model), and sensitivity and specificity at the
model's threshold. Every number carries a 95 % interval from one patient-level bootstrap: the
same resamples of patients serve every subgroup, so that the largest gap between two subgroups
of an attribute (the best and the worst by the point estimate, for AUROC and for the true-positive
rate) gets its own interval from them. A gap whose interval excludes 0 is a difference the data
support; one whose interval includes 0 is not shown to be there.

A subgroup with fewer than ``min_patients`` patients is listed with its counts and no numbers,
and says why: intervals from a handful of patients say nothing.
"""

from __future__ import annotations

import numpy as np

from xray_dist.data.classes import abnormal_score, abnormal_truth
from xray_dist.results.metrics import auroc, cluster_resamples, percentile_interval, sens_spec

#: The fewest patients a subgroup needs for its numbers (``evaluate --min-patients``).
MIN_PATIENTS = 10
#: The metrics whose largest gap between subgroups is reported (AUROC, and the true-positive rate).
GAP_METRICS = ("auc_abnormal", "sensitivity")


def _metric_functions(targets: np.ndarray, probs: np.ndarray, keys: list[str], threshold: float,
                      multilabel: bool) -> dict:
    """Metric name → function of row indices, for one model's scores (unknown truths left out)."""
    truth = abnormal_truth(targets, multilabel)
    score = abnormal_score(probs, multilabel)

    def on(y_all, s_all, fn):
        def stat(rows):
            y, s = y_all[rows], s_all[rows]
            known = y >= 0
            return fn(y[known], s[known]) if known.any() else float("nan")
        return stat

    out = {"auc_abnormal": on(truth, score, auroc),
           "sensitivity": on(truth, score, lambda y, s: sens_spec(y, s, threshold)[0]),
           "specificity": on(truth, score, lambda y, s: sens_spec(y, s, threshold)[1])}
    if multilabel:
        for j, key in enumerate(keys):
            out[f"auc_{key}"] = on(np.asarray(targets)[:, j].astype(int), np.asarray(probs)[:, j], auroc)
    return out


def subgroup_metrics(groups: dict[str, np.ndarray], targets: np.ndarray, probs: np.ndarray, patients: np.ndarray,
                     keys: list[str], threshold: float, multilabel: bool, n_boot: int = 1000, seed: int = 0,
                     min_patients: int = MIN_PATIENTS) -> dict:
    """``{attribute: {"groups": [...], "gaps": {...}}}`` for ``groups`` (attribute → each image's value).

    Each group: ``value``, ``images``, ``patients``, ``prevalence`` (abnormal share of images with a
    known truth), and each metric as ``{"value", "ci95"}`` — or, below ``min_patients``, ``skipped``
    with the reason. Each gap: ``between`` (best, worst group), ``value`` and ``ci95``."""
    patients = np.asarray(patients)
    truth = abnormal_truth(targets, multilabel)
    stats = _metric_functions(targets, probs, keys, threshold, multilabel)
    plan = []  # (attribute, value, row mask) of every group with enough patients
    out: dict[str, dict] = {}
    for attr, values in groups.items():
        values = np.asarray(values, dtype=object)
        entries = []
        for v in sorted(set(values.tolist())):
            mask = values == v
            known = truth[mask] >= 0
            entry = {"value": v, "images": int(mask.sum()), "patients": int(len(set(patients[mask].tolist()))),
                     "prevalence": float(np.mean(truth[mask][known] == 1)) if known.any() else float("nan")}
            if entry["patients"] < min_patients:
                entry["skipped"] = f"fewer than {min_patients} patients (--min-patients)"
            else:
                plan.append((attr, v, mask))
            entries.append(entry)
        out[attr] = {"groups": entries, "gaps": {}}
    points = {(a, v): {m: fn(np.flatnonzero(mask)) for m, fn in stats.items()} for a, v, mask in plan}
    draws: dict[tuple, dict[str, list]] = {(a, v): {m: [] for m in stats} for a, v, _ in plan}
    strata = (truth == 1).astype(int)
    for idx in cluster_resamples(patients, n_boot, seed, strata):
        for a, v, mask in plan:
            rows = idx[mask[idx]]
            for m, fn in stats.items():
                draws[(a, v)][m].append(fn(rows) if len(rows) else float("nan"))
    for a, v, _ in plan:
        entry = next(e for e in out[a]["groups"] if e["value"] == v)
        for m in stats:
            entry[m] = {"value": points[(a, v)][m], "ci95": list(percentile_interval(draws[(a, v)][m], n_boot))}
    for attr in out:
        for m in GAP_METRICS:
            gap = _gap(attr, m, plan, points, draws, n_boot)
            if gap:
                out[attr]["gaps"][m] = gap
    return out


def _gap(attr: str, metric: str, plan: list, points: dict, draws: dict, n_boot: int) -> dict | None:
    """The best minus the worst group of ``attr`` on ``metric`` (chosen by the point estimates),
    with the interval of that same difference over the shared resamples; None with under 2 groups."""
    shown = [v for a, v, _ in plan if a == attr and not np.isnan(points[(a, v)][metric])]
    if len(shown) < 2:
        return None
    ranked = sorted(shown, key=lambda v: -points[(attr, v)][metric])  # ties: two different groups still
    best, worst = ranked[0], ranked[-1]
    diffs = np.asarray(draws[(attr, best)][metric]) - np.asarray(draws[(attr, worst)][metric])
    return {"between": [best, worst], "value": points[(attr, best)][metric] - points[(attr, worst)][metric],
            "ci95": list(percentile_interval(diffs.tolist(), n_boot))}


def csv_rows(subgroups: dict) -> list[dict]:
    """``subgroups.csv``: one row per attribute, value and metric (and one per gap)."""
    rows = []
    for attr, res in subgroups.items():
        for g in res["groups"]:
            base = {"attribute": attr, "value": g["value"], "images": g["images"], "patients": g["patients"],
                    "prevalence": g["prevalence"]}
            metrics = [k for k, v in g.items() if isinstance(v, dict)]
            if not metrics:
                rows.append({**base, "metric": "", "estimate": "", "ci_low": "", "ci_high": "",
                             "note": g.get("skipped", "")})
            for k in metrics:
                rows.append({**base, "metric": k, "estimate": g[k]["value"], "ci_low": g[k]["ci95"][0],
                             "ci_high": g[k]["ci95"][1], "note": ""})
        for m, gap in res["gaps"].items():
            rows.append({"attribute": attr, "value": " - ".join(map(str, gap["between"])), "images": "",
                         "patients": "", "prevalence": "", "metric": f"gap_{m}", "estimate": gap["value"],
                         "ci_low": gap["ci95"][0], "ci_high": gap["ci95"][1], "note": "largest gap (best - worst)"})
    return rows


CSV_COLUMNS = ["attribute", "value", "images", "patients", "prevalence", "metric", "estimate", "ci_low", "ci_high",
               "note"]
