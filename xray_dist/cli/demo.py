"""``xray-dist demo``: the local single-node test mode, end to end on embedded Ray and the CPU.

synth → prepare (train / validation / held-out test patients) → train (2 workers would need a
cluster; here 1 worker mirrored over 2 logical CPU devices, so the multi-device path runs too) →
evaluate on the test patients (patient-level 95 % interval) → predict on the validation files →
Grad-CAM on a few of them → a serving export → a tiny sweep (two head widths on shared frozen
features), its best trial evaluated on the test patients → the HTML report of the run and the sweep.
One function per step, each printing its lines.

The numbers are meant to teach: the synthetic finding's contrast is drawn per image from 0 (invisible)
to full, so no model separates every image and the test AUROC has an interval of real width; the
VGG16 base is random (no ImageNet download), so the run trains the head on the frozen base (what a
first fine-tune on ImageNet weights does too) long enough for its probabilities to mean something,
and keeps the epoch with the best validation accuracy: argmax accuracy and AUROC tell one story.
"""

from __future__ import annotations

import time
from pathlib import Path

from xray_dist.cli.common import add_precision_flag, command
from xray_dist.cli.prepare import format_prepare_summary
from xray_dist.config import PrepareConfig, PreprocessSpec, SweepConfig, TrainConfig
from xray_dist.data.cache import load_manifest
from xray_dist.data.prepare import prepare
from xray_dist.data.synth import synthesize
from xray_dist.inference.explain import explain_files
from xray_dist.inference.export import export_model
from xray_dist.inference.predict import predict_files
from xray_dist.infra import console, storage
from xray_dist.infra.runtime import init_ray
from xray_dist.results.calibrate import calibrate_run
from xray_dist.results.evaluate import evaluate_model
from xray_dist.results.report import write_report
from xray_dist.training.driver import train
from xray_dist.training.sweep_results import settings_text
from xray_dist.training.tune import sweep

#: Epochs of the demo's run and of each sweep trial: the head on a random frozen base needs this many
#: for its probabilities to move off 0.5 (at 8 it still predicts one class for every image).
_EPOCHS = 20

#: What the demo's last lines point at, under its directory.
_LOOK_AT = ("run/evaluation/test/reliability.png", "sweep_report.html")


def add_demo(sub) -> None:
    p = command(sub, "demo", "local single-node test mode: synth -> prepare -> train -> evaluate -> ... -> report",
                "The whole flow on this machine's CPUs in about two minutes, on synthetic DICOM files.")
    p.add_argument("--out", default="xray-dist-demo", help="directory for everything the demo writes")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for embedded local Ray (default: all)")
    add_precision_flag(p)  # training, the sweep, evaluate, predict and explain alike


def cmd_demo(a) -> int:
    if storage.is_uri(a.out):
        raise ValueError(f"--out {a.out}: the demo is the local single-node test mode; give it a local directory")
    run_demo(a.out, num_cpus=a.num_cpus, precision=a.precision)
    return 0


def run_demo(out: str | Path, num_cpus: int | None = None, precision: str = "auto") -> dict:
    """Every step of the demo into ``out``; what each step returned, by step."""
    out = Path(out).resolve()
    t0 = time.time()
    init_ray(None, num_cpus)
    labels_csv = _synth(out)
    report = _prepare(out, labels_csv)
    res = _train(out, precision)
    ev = _evaluate(out, precision)
    manifest = load_manifest(out / "cache").to_pandas()
    val = manifest[manifest.split == "val"]
    rows = _predict(out, val, res.metrics["best"]["threshold"], precision)
    _explain_and_export(out, val, precision)
    summary = _tune(out, precision)
    summary["test"] = _evaluate_sweep(out, precision)
    _report(out)
    _closing_lines(out, t0)
    return {"prepare": report, "train": res.metrics, "test": ev, "predictions": rows, "sweep": summary,
            "report": out / "report.html"}


def _synth(out: Path) -> Path:
    print(f"[demo 1/9] synth: synthetic chest radiographs -> {out / 'data'}")
    syn = synthesize(out / "data", patients=80, images_per_patient=2, size=128, seed=7, strength=(0.0, 1.0))
    print(f"           {len(syn.files)} DICOM files in 8 encodings; the finding's contrast varies from invisible "
          "to plain")
    return syn.labels_csv


def _prepare(out: Path, labels_csv: Path) -> dict:
    print(f"[demo 2/9] prepare: decode once in parallel Ray tasks -> {out / 'cache'}")
    report = prepare(PrepareConfig(data_dir=str(out / "data"), labels=str(labels_csv), out=str(out / "cache"),
                                   preprocess=PreprocessSpec(image_size=32), val_fraction=0.2, test_fraction=0.25))
    print(format_prepare_summary(report, str(out / "cache")))
    return report


def _train(out: Path, precision: str):
    print(f"[demo 3/9] train: the head on a frozen VGG16 base (random weights) with Ray Train -> {out / 'run'}")
    res = train(TrainConfig(cache=str(out / "cache"), out=str(out / "run"), epochs=_EPOCHS, batch_size=4, lr=1e-2,
                            weights="none", unfreeze_blocks=0, cpu_replicas=2, metric="val_accuracy",
                            precision=precision))
    m = res.metrics
    print(f"           epoch {m['best_epoch']} of {m['epochs']} kept: validation accuracy "
          f"{m['best']['val_accuracy']:.2f}, AUROC abnormal {m['val_auc_abnormal']:.3f}; "
          f"computed in {(m.get('precision') or {}).get('compute', 'float32')}")
    # a short run's probabilities hug 0.5: a temperature fitted on validation spreads them (ranks kept)
    c = calibrate_run(str(out / "run"))
    print(f"           calibrated: temperature {c['temperature']:.3f} fitted on validation, ECE "
          f"{c['val_ece'][0]:.3f} -> {c['val_ece'][1]:.3f}")
    return res


def _evaluate(out: Path, precision: str) -> dict:
    print(f"[demo 4/9] evaluate: the held-out test patients, once -> {out / 'run' / 'evaluation' / 'test'}")
    ev = evaluate_model(str(out / "run"), str(out / "cache"), precision=precision)
    print(f"           test AUROC abnormal {_ci(ev['auc_abnormal'])}, accuracy {_ci(ev['accuracy'])} "
          f"({ev['patients']} patients, {ev['images']} images; patient-level bootstrap)")
    print(f"           at the validation threshold: sensitivity {ev['sensitivity']['value']:.2f}, specificity "
          f"{ev['specificity']['value']:.2f}; calibration error (ECE) {ev['ece']['value']:.3f}")
    return ev


def _ci(metric: dict) -> str:
    lo, hi = metric["ci95"]
    return f"{metric['value']:.3f} (95 % CI {lo:.3f}-{hi:.3f})"


def _predict(out: Path, val, threshold: float, precision: str) -> list[dict]:
    print(f"[demo 5/9] predict: the validation files -> {out / 'predictions.csv'}")
    rows = predict_files(out / "run", [str(out / "data" / p) for p in val.path], out / "predictions.csv",
                         precision=precision)
    # rows come in input order; the decision is the model's stored threshold on the abnormal score
    correct = sum(r["abnormal_at_threshold"] == (label != "normal") for r, label in zip(rows, val.label))
    print(f"           {correct}/{len(rows)} validation files on the right side of the threshold "
          f"{threshold:.3f} (abnormal vs normal)")
    return rows


def _explain_and_export(out: Path, val, precision: str) -> None:
    print(f"[demo 6/9] explain: Grad-CAM for 4 validation files -> {out / 'explain'}")
    cams = explain_files(out / "run", [str(out / "data" / p) for p in val.path[:4]], out / "explain",
                         precision=precision)
    print(f"           {sum(not r['error'] for r in cams)} heatmaps (PNG + .npy)")
    print(f"[demo 7/9] export: SavedModel (uint8 image in, class probabilities out) -> {out / 'export'}")
    export_model(out / "run", out / "export", "savedmodel")


def _tune(out: Path, precision: str) -> dict:
    print(f"[demo 8/9] tune: a tiny sweep (head width 0 vs 16, on shared frozen features) "
          f"-> {out / 'sweep'}")
    summary = sweep(SweepConfig(base=TrainConfig(cache=str(out / "cache"), out=str(out / "sweep"), epochs=_EPOCHS,
                                                 batch_size=4, lr=1e-2, weights="none", metric="val_accuracy",
                                                 precision=precision),
                                out=str(out / "sweep"), combos=((0, 2, 0), (16, 2, 0)), lr=(1e-2, 1e-2),
                                scheduler="fifo"))
    best = summary.get("best", {})
    print(f"           {summary['completed']} trials completed; the best: {settings_text(best.get('config', {}))} "
          f"(validation accuracy {best.get('metrics', {}).get('val_accuracy', float('nan')):.2f})")
    return summary


def _evaluate_sweep(out: Path, precision: str) -> dict:
    ev = evaluate_model(str(out / "sweep"), str(out / "cache"), precision=precision)
    print(f"           its held-out test AUROC abnormal {_ci(ev['auc_abnormal'])}, accuracy {_ci(ev['accuracy'])}")
    return ev


def _report(out: Path) -> None:
    print(f"[demo 9/9] report: HTML for the run and the sweep -> {out / 'report.html'}, {out / 'sweep_report.html'}")
    write_report(out / "sweep", out / "sweep_report.html")
    write_report(out / "run", out / "report.html")  # last: MODEL_CARD.md beside them is the run's


def _closing_lines(out: Path, t0: float) -> None:
    print(f"\ndemo finished in {time.time() - t0:.0f} s. Everything is under {out} (run/, sweep/, explain/, "
          f"export/, predictions.csv); look at {', '.join(_LOOK_AT)} there, and first:")
    print(f"report: {out / 'report.html'}")
    if console.log_file():
        print(f"log (Ray, TensorFlow and per-worker detail): {console.log_file()}")
