"""The inference stage's commands: ``predict`` (class probabilities per file), ``explain``
(Grad-CAM heatmaps) and ``export`` (a serving model)."""

from __future__ import annotations

import sys

from xray_dist.cli.common import add_path_flags, add_precision_flag, add_ray_flags, command, path_names
from xray_dist.config import ENGINES, EXPORT_FORMATS, PRECISIONS
from xray_dist.inference.explain import explain_files
from xray_dist.inference.export import export_model
from xray_dist.inference.predict import predict_files
from xray_dist.infra import storage


def add_predict(sub) -> None:
    p = command(sub, "predict", "class probabilities for DICOM files with a trained run",
                "One CSV row per input file: each class's (or finding's) probability, the abnormal score and "
                "decision, or the reason a file could not be read.")
    p.add_argument("inputs", nargs="+", help="DICOM files, directories or object-store prefixes")
    p.add_argument("--model", required=True, help="a run directory from `xray-dist train` (or a sweep trial)")
    p.add_argument("--out", required=True, help="CSV to write (local path or URI)")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="local: score in this process; ray: Ray Data batch inference (decode in CPU tasks, model in "
                        "an actor pool, GPUs when present); auto: ray for object-store inputs or 256+ files")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call")
    add_precision_flag(p)
    add_ray_flags(p)
    add_path_flags(p, "the CSV and the log", salt=True)


def cmd_predict(a) -> int:
    rows = predict_files(a.model, a.inputs, a.out, batch_size=a.batch_size, engine=a.engine, address=a.address,
                         num_cpus=a.num_cpus,
                         names=path_names(a), path_map=a.path_map, precision=a.precision, uid_names=a.uid_names)
    bad = sum(1 for r in rows if r["error"])
    print(f"predict: {len(rows) - bad} files scored, {bad} unreadable (see the error column) -> {a.out}")
    if bad == len(rows):
        print(f"xray-dist predict: error: {'none of the %d files could be scored' % bad if rows else 'no input files'}",
              file=sys.stderr)
        return 1
    return 0


def add_explain(sub) -> None:
    p = command(sub, "explain", "Grad-CAM heatmaps: where the model looks, per input file",
                "For each input: the model input with a Grad-CAM heatmap over it (PNG), the heatmap (.npy), and a "
                "row in explain.csv (or the reason the file could not be read).")
    p.add_argument("inputs", nargs="+", help="DICOM files or directories")
    p.add_argument("--model", required=True, help="a run directory from `xray-dist train` (or a sweep trial)")
    p.add_argument("--out", required=True, help="directory for <name>.png, <name>.npy and explain.csv")
    p.add_argument("--class", dest="class_name", default=None,
                   help="class (or finding) name, finding key or index to explain (default: the predicted class, "
                        "or the most probable finding)")
    add_precision_flag(p)
    add_path_flags(p, "explain.csv, the image file names and titles, and the log", salt=True)


def cmd_explain(a) -> int:
    rows = explain_files(a.model, a.inputs, a.out, a.class_name, names=path_names(a), path_map=a.path_map,
                         precision=a.precision)
    bad = [r for r in rows if r["error"]]
    print(f"explain: {len(rows) - len(bad)} heatmaps, {len(bad)} unreadable (see explain.csv) -> {a.out}")
    if len(bad) == len(rows):
        what = f"none of the {len(bad)} files could be explained" if rows else "no input files"
        print(f"xray-dist explain: error: {what}", file=sys.stderr)
        return 1
    return 0


def add_export(sub) -> None:
    p = command(sub, "export", "a serving model: cached-format image in, class probabilities out",
                "Writes a SavedModel (no xray-dist code needed to load it) or a .keras file, with serving.json.")
    p.add_argument("--model", required=True, help="a run directory from `xray-dist train` (or a sweep trial)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="savedmodel", help="serving format")
    p.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="what the serving model computes in (weights float32 either way): float32 (default: the "
                        "serving machine is unknown), bfloat16 (for CPUs with AMX, or GPUs), or auto (as this "
                        "machine predicts); the written model is checked against the run's before it is kept")


def cmd_export(a) -> int:
    path = export_model(a.model, a.out, a.format, a.precision)
    check = storage.read_json(storage.join(str(a.out), "serving.json"))["check"]
    print(f"export: {a.format} in {check['precision']} -> {path} (with model_spec.json and serving.json); checked: "
          f"largest probability difference from the run {check['max_abs_diff']:.1e} on {check['images']} probe "
          f"images (bound {check['bound']:g})")
    return 0
