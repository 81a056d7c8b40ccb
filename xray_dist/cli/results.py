"""The results stage's commands: ``evaluate`` (the held-out numbers to report) and ``report``
(one HTML page for a run or a sweep)."""

from __future__ import annotations

from xray_dist.cli.common import add_precision_flag, at_least, command
from xray_dist.data.subgroups import ATTRIBUTES
from xray_dist.errors import XrayDistError
from xray_dist.infra import storage
from xray_dist.results.calibrate import calibrate_run
from xray_dist.results.evaluate import Subgroups, evaluate_model, resolve_target
from xray_dist.results.subgroups import MIN_PATIENTS
from xray_dist.results.report import write_report


def add_evaluate(sub) -> None:
    p = command(sub, "evaluate", "score a held-out split once, with patient-level 95 % intervals",
                "The numbers to report: the model (a run, or a sweep's best trial) scored once on patients that "
                "took part in no choice, at the threshold chosen on validation.")
    p.add_argument("--model", required=True, help="a run directory, or a sweep directory (its best trial)")
    p.add_argument("--cache", required=True, help="the cache the model was trained with (or, with --external, "
                                                   "another one)")
    p.add_argument("--external", action="store_true",
                   help="--cache is a cache the model never saw (another hospital): score every image of it, marked "
                        "external (its preprocessing must be the model's)")
    p.add_argument("--split", default="test", help="test, or val (optimistic: used for selection)")
    p.add_argument("--out", help="directory to write (default: MODEL/evaluation/SPLIT, where report finds it)")
    p.add_argument("--bootstrap", type=at_least(100), default=1000, help="patient resamples for the intervals")
    p.add_argument("--by", default="", metavar="ATTRS",
                   help=f"also break the numbers down by subgroup: some of {','.join(ATTRIBUTES)} "
                        "(with the largest gap between subgroups and its interval)")
    p.add_argument("--min-patients", type=at_least(1), default=MIN_PATIENTS,
                   help="a subgroup with fewer patients is listed without numbers")
    add_precision_flag(p)


def _fmt(v, lo, hi) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def cmd_evaluate(a) -> int:
    by = tuple(s.strip() for s in a.by.split(",") if s.strip())
    m = evaluate_model(a.model, a.cache, a.split, a.out, a.bootstrap, subgroups=Subgroups(by, a.min_patients),
                       external=a.external, precision=a.precision)

    def ci(k):
        return _fmt(m[k]["value"], *m[k]["ci95"])

    where = "external cache (every image)" if m["external"] else f"{m['split']} split"
    print(f"evaluate: {where}, {m['images']} images of {m['patients']} patients"
          + (" (OPTIMISTIC: validation chose the model and threshold)" if m["optimistic"] else ""))
    print(f"  AUROC abnormal {ci('auc_abnormal')}; at threshold {m['threshold']:.3f}: sensitivity "
          f"{ci('sensitivity')}, specificity {ci('specificity')}")
    if m["external"]:
        n = m["overlap"]["patients_in_training_cache"]
        print(f"  patient keys also in the training cache: {'not checked' if n is None else n} "
              "(comparable only with the same salt)")
    for attr, res in m.get("subgroups", {}).items():
        gap = res["gaps"].get("auc_abnormal")
        small = sum(1 for g in res["groups"] if "skipped" in g)
        print(f"  by {attr}: {len(res['groups'])} subgroups" + (f" ({small} under --min-patients)" if small else "")
              + (f"; largest AUROC gap {gap['between'][0]} - {gap['between'][1]}: {_fmt(gap['value'], *gap['ci95'])}"
                 if gap else ""))
    if "calibration" in m:
        c = m["calibration"]
        print(f"  calibrated (temperature fitted on validation): ECE {_fmt(c['ece_before']['value'], *c['ece_before']['ci95'])}"
              f" -> {_fmt(c['ece_after']['value'], *c['ece_after']['ci95'])}")
    print(f"  95 % intervals: patient-level bootstrap ({a.bootstrap} resamples) -> {m['out']}")
    return 0


def add_calibrate(sub) -> None:
    p = command(sub, "calibrate", "temperature scaling: honest probabilities, fitted on validation",
                "Fits a temperature on the run's validation scores (one per finding, multi-label) and stores it "
                "with the model, the threshold re-chosen on the calibrated scores. predict, evaluate and export then "
                "give calibrated probabilities; AUROC does not change.")
    p.add_argument("--model", required=True, help="a run directory, or a sweep directory (its best trial)")


def cmd_calibrate(a) -> int:
    report_calibration(calibrate_run(resolve_target(a.model)[0]))
    return 0


def calibrate_after_training(target: str) -> None:
    """``train --calibrate temperature`` / ``tune --calibrate temperature``: calibrate the run (the
    sweep's best trial) just trained; a model calibrate refuses (a softmax over 3+ classes) is left
    as it is, and the line says why."""
    try:
        report_calibration(calibrate_run(resolve_target(target)[0]))
    except XrayDistError as e:
        print(f"calibrate: not calibrated: {e}")


def report_calibration(r: dict) -> None:
    """The lines ``calibrate`` prints."""
    t = r["temperature"]
    shown = ", ".join(f"{k} {v:.3f}" for k, v in t.items()) if isinstance(t, dict) else f"{t:.3f}"
    print(f"calibrate: temperature {shown} (fitted on validation): ECE {r['val_ece'][0]:.4f} -> {r['val_ece'][1]:.4f}, "
          f"Brier {r['val_brier'][0]:.4f} -> {r['val_brier'][1]:.4f}; threshold {r['threshold_uncalibrated']:.3f} -> "
          f"{r['threshold']:.3f}")
    print(f"  stored in {r['model_dir']}/model_spec.json; predict, evaluate and export now calibrate")


def add_report(sub) -> None:
    p = command(sub, "report", "one self-contained HTML report for a run or a sweep",
                "Held-out test numbers first (when evaluate has run), validation metrics with patient-level "
                "intervals, curves, ROC, calibration and the dataset, in one HTML file.")
    p.add_argument("target", help="a run directory (xray-dist train) or a sweep directory (xray-dist tune)")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--bootstrap", type=at_least(1), default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--intended-use", default=None, metavar="TEXT",
                   help="what the model is for, in the model card (MODEL_CARD.md beside the report); "
                        "default: a placeholder saying it was not stated")


def cmd_report(a) -> int:
    path = write_report(a.target, a.out, n_boot=a.bootstrap, intended_use=a.intended_use)
    print(f"report: {storage.absolute(path)}")
    print(f"  model card: {storage.join(storage.parent(storage.absolute(path)), 'MODEL_CARD.md')}")
    return 0
