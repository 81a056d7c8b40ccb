"""``xray-dist demo``: the local single-node test mode, end to end on embedded Ray and the CPU.

synth → prepare → train (2 workers would need a cluster; here 1 worker mirrored over 2 logical
CPU devices, so the multi-device path runs too) → predict on the held-out validation files →
Grad-CAM on a few of them → a serving export → a tiny sweep (two head widths on shared frozen
features) → the HTML report of the run and the sweep.
"""

from __future__ import annotations

import time
from pathlib import Path


def run_demo(out: str | Path, num_cpus: int | None = None) -> dict:
    from xray_dist.cli import format_prepare_summary
    from xray_dist.config import PrepareConfig, PreprocessSpec, TrainConfig
    from xray_dist.dataset import load_manifest, prepare
    from xray_dist.predict import predict_files
    from xray_dist.runtime import init_ray
    from xray_dist.synth import synthesize
    from xray_dist.train import train

    out = Path(out).resolve()
    t0 = time.time()
    init_ray(None, num_cpus)
    print(f"[demo 1/8] synth: synthetic chest radiographs -> {out / 'data'}")
    syn = synthesize(out / "data", patients=48, images_per_patient=2, size=128, seed=7)
    print(f"           {len(syn.files)} DICOM files in 8 encodings")

    print(f"[demo 2/8] prepare: decode once in parallel Ray tasks -> {out / 'cache'}")
    report = prepare(PrepareConfig(data_dir=str(out / "data"), labels=str(syn.labels_csv), out=str(out / "cache"),
                                   preprocess=PreprocessSpec(image_size=32)))
    print(format_prepare_summary(report, str(out / "cache")))

    print(f"[demo 3/8] train: VGG16 (random init, all blocks trainable) with Ray Train -> {out / 'run'}")
    res = train(TrainConfig(cache=str(out / "cache"), out=str(out / "run"), epochs=3, batch_size=8, lr=1e-4,
                            weights="none", unfreeze_blocks=5, cpu_replicas=2))
    m = res.metrics
    print(f"           val_auc_abnormal {m['val_auc_abnormal']:.3f}, sensitivity {m['sensitivity']:.2f}, "
          f"specificity {m['specificity']:.2f} (best of {m['epochs']} epochs)")

    print(f"[demo 4/8] predict: held-out validation files -> {out / 'predictions.csv'}")
    manifest = load_manifest(out / "cache").to_pandas()
    val = manifest[manifest.split == "val"]
    rows = predict_files(out / "run", [str(out / "data" / p) for p in val.path], out / "predictions.csv")
    correct = sum(r["prediction"] == label for r, label in zip(rows, val.label))  # rows in input order
    print(f"           {correct}/{len(rows)} validation files predicted correctly (argmax)")

    from xray_dist.explain import explain_files
    from xray_dist.export import export_model

    print(f"[demo 5/8] explain: Grad-CAM for 4 validation files -> {out / 'explain'}")
    cams = explain_files(out / "run", [str(out / "data" / p) for p in val.path[:4]], out / "explain")
    print(f"           {sum(not r['error'] for r in cams)} heatmaps (PNG + .npy)")
    print(f"[demo 6/8] export: SavedModel (uint8 image in, class probabilities out) -> {out / 'export'}")
    export_model(out / "run", out / "export", "savedmodel")

    print(f"[demo 7/8] tune: a tiny sweep (head width 0 vs 16, block 5 trainable on shared frozen features) "
          f"-> {out / 'sweep'}")
    from xray_dist.config import SweepConfig
    from xray_dist.tune import sweep

    summary = sweep(SweepConfig(base=TrainConfig(cache=str(out / "cache"), out=str(out / "sweep"), epochs=2,
                                                 batch_size=8, lr=1e-3, weights="none"),
                                out=str(out / "sweep"), combos=((0, 2, 1), (16, 2, 1)), lr=(1e-3, 1e-3),
                                scheduler="fifo"))
    best = summary.get("best", {})
    print(f"           {summary['completed']} trials completed; best {best.get('config')} "
          f"val_auc_abnormal {best.get('metrics', {}).get('val_auc_abnormal', float('nan')):.3f}")

    from xray_dist.report import write_report

    print(f"[demo 8/8] report: HTML for the run and the sweep -> {out / 'report.html'}, {out / 'sweep_report.html'}")
    write_report(out / "run", out / "report.html")
    write_report(out / "sweep", out / "sweep_report.html")

    print(f"\ndemo finished in {time.time() - t0:.0f} s. Look at:")
    for name in ("cache/prepare_report.json", "run/metrics.json", "run/training_curves.png", "run/roc.png",
                 "run/tensorboard", "predictions.csv", "explain", "export/serving.json", "sweep/results.csv",
                 "sweep/best.json", "sweep/sweep.png", "sweep_report.html"):
        print(f"  {out / name}")
    print(f"report: {out / 'report.html'}")
    return {"prepare": report, "train": m, "predictions": rows, "sweep": summary, "report": out / "report.html"}
