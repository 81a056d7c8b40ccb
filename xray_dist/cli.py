"""``xray-dist`` subcommands. Thin: parse flags, build one config, call one function, print."""

from __future__ import annotations

import argparse
import io
import logging
import sys

from typing import TYPE_CHECKING

from xray_dist import storage
from xray_dist.errors import XrayDistError

if TYPE_CHECKING:
    from xray_dist.config import TrainConfig

log = logging.getLogger("xray_dist")


def _at_least(lo: int):
    """An argparse type: an integer >= ``lo`` (checked before anything starts)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    parse.__name__ = f"integer >= {lo}"
    return parse


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="decode DICOMs once into a Parquet cache with a patient-level split")
    p.add_argument("data_dir")
    p.add_argument("--labels", help="labels file (see --labels-format); default: a folder per class")
    p.add_argument("--labels-format", choices=["csv", "nih", "chexpert", "rsna", "mimic"], default="csv",
                   help="csv: a path (or file name/stem) and a label column, several findings as A|B; nih: "
                        "Data_Entry_2017.csv; chexpert: train.csv/valid.csv; rsna: stage_2_train_labels.csv; mimic: "
                        "mimic-cxr-2.0.0-chexpert.csv with --metadata (default: %(default)s)")
    p.add_argument("--uncertain", choices=["ignore", "zeros", "ones"], default="ignore",
                   help="chexpert/mimic: what an uncertain (-1) finding becomes: ignore (left out of that image's "
                        "loss and metrics), zeros (absent) or ones (present) (default: %(default)s)")
    p.add_argument("--metadata", help="mimic: mimic-cxr-2.0.0-metadata.csv, joining dicom_id to study and view")
    p.add_argument("--views", default="",
                   help="keep only these views, e.g. PA,AP (frontal): from the labels' view column, else the DICOM "
                        "View Position (0018,5101); the others are listed in the report (default: all views)")
    p.add_argument("--path-column", default="path")
    p.add_argument("--label-column", default="label")
    p.add_argument("--patient-column", default=None,
                   help="labels CSV column naming each image's patient (hashed like header IDs; default: the "
                        "DICOM Patient ID, else the Study Instance UID, else the file)")
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--keep-burned-in", action="store_true",
                   help="use images whose (0028,0301) Burned In Annotation is YES (default: quarantined)")
    p.add_argument("--salt-file", help="file holding the patient-key salt, kept apart from the cache (made when "
                                       "missing; default: CACHE/.salt, or XRAY_DIST_SALT)")
    _add_path_flags(p, "the cache and its report")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--test-fraction", type=float, default=0.0)
    p.add_argument("--split-file", action="append", default=[],
                   help="official splits: a CSV of path or patient plus split (train/val/test/train_val), or a "
                        "list of file names named for its split (test_list.txt, train_val_list.txt); repeatable. "
                        "Fixes those splits; validation is drawn from train_val and from files it does not name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else embedded local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs for embedded local Ray (default: all)")


def cmd_prepare(a) -> int:
    from xray_dist.config import PrepareConfig, PreprocessSpec
    from xray_dist.dataset import prepare

    cfg = PrepareConfig(
        data_dir=a.data_dir, out=a.out, labels=a.labels, path_column=a.path_column, label_column=a.label_column,
        patient_column=a.patient_column, labels_format=a.labels_format, uncertain=a.uncertain, metadata=a.metadata,
        views=tuple(v.strip().upper() for v in a.views.split(",") if v.strip()),
        preprocess=PreprocessSpec(image_size=a.image_size, burned_in="keep" if a.keep_burned_in else "reject"),
        salt_file=a.salt_file, paths="redact" if a.redact_paths else "relative", path_map=a.path_map,
        split_files=tuple(a.split_file),
        val_fraction=a.val_fraction,
        test_fraction=a.test_fraction, seed=a.seed, address=a.address, num_cpus=a.num_cpus,
    )
    report = prepare(cfg)
    print(format_prepare_summary(report, a.out))
    return 0


def format_prepare_summary(report: dict, out: str) -> str:
    lines = [
        f"prepare: {report['ok']} of {report['found']} files used, {len(report['quarantined'])} quarantined, "
        + (f"{len(report['excluded'])} excluded by view, " if report.get("excluded") else "")
        + f"{len(report['missing'])} label rows without a file, {len(report['unlabeled'])} unlabeled files"
        + (" (cache reused)" if report["cache_reused"] else ""),
        ("  findings (images): " if report.get("task") == "multilabel" else "  classes: ")
        + ", ".join(f"{k}={v}" for k, v in report["classes"].items()),
        "  splits:  " + ", ".join(f"{k}={v['images']} images/{v['patients']} patients" for k, v in report["splits"].items()),
        "  patient keys from: " + ", ".join(f"{k.replace('_', ' ')}={v}"
                                            for k, v in report.get("patients_grouped_by", {}).items()),
    ]
    for q in report["quarantined"][:10]:
        lines.append(f"  quarantined {q['path']}: {q['reason']}")
    if len(report["quarantined"]) > 10:
        lines.append(f"  ... and {len(report['quarantined']) - 10} more")
    for m in report["missing"][:5]:
        lines.append(f"  missing {m['path']}: {m['reason']}")
    for w in report.get("warnings", []):
        lines.append(f"  warning: {w}")
    lines.append(f"  report: {storage.join(storage.absolute(out), 'prepare_report.json')}")
    return "\n".join(lines)


def _add_path_flags(p, where: str, salt: bool = False) -> None:
    p.add_argument("--redact-paths", action="store_true",
                   help=f"name files in {where} by a salted key instead of their relative path (xray_dist.paths)")
    p.add_argument("--path-map", help="with --redact-paths: CSV to write key,path to (keep it private; never inside "
                                      "the outputs)")
    if salt:
        p.add_argument("--salt-file", help="with --redact-paths: the salt (made when missing; XRAY_DIST_SALT wins); "
                                           "give prepare's salt to get the cache's keys")


def _path_names(a):
    """:class:`~xray_dist.paths.PathNames` from predict/explain flags."""
    from xray_dist.errors import XrayDistError
    from xray_dist.paths import REDACT, RELATIVE, PathNames, resolve_salt

    if a.path_map and not a.redact_paths:
        raise XrayDistError("--path-map is written with --redact-paths only")
    if not a.redact_paths:
        return PathNames(RELATIVE)
    salt = resolve_salt(a.salt_file)
    if not salt:
        raise XrayDistError("--redact-paths needs a salt: --salt-file FILE (prepare's, to get the cache's keys) or "
                            "XRAY_DIST_SALT")
    return PathNames(REDACT, salt)


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write synthetic chest-like radiographs as DICOM files + labels.csv")
    p.add_argument("out")
    p.add_argument("--patients", type=int, default=40)
    p.add_argument("--images-per-patient", type=int, default=2)
    p.add_argument("--classes", default="normal,finding", help="comma-separated; the first has no finding")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)


def cmd_synth(a) -> int:
    from xray_dist.synth import synthesize

    classes = tuple(c.strip() for c in a.classes.split(",") if c.strip())
    storage.check_location(a.out)
    with storage.staged_output(a.out, marker="labels.csv") as local:  # a URI gets the files when all are written
        r = synthesize(local, patients=a.patients, images_per_patient=a.images_per_patient, classes=classes,
                       size=a.size, seed=a.seed)
    out = storage.absolute(a.out)
    print(f"synth: wrote {len(r.files)} DICOM files for {a.patients} patients to {out}; labels in "
          f"{storage.join(out, 'labels.csv')}")
    return 0


def _add_preview(sub) -> None:
    p = sub.add_parser("preview", help="write a PNG of exactly what the model sees for one DICOM file")
    p.add_argument("file")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=224)


def cmd_preview(a) -> int:
    from PIL import Image

    from xray_dist.config import PreprocessSpec
    from xray_dist.dicom import load_image

    img = load_image(a.file, PreprocessSpec(image_size=a.size))
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG")
    storage.write_bytes(a.out, buf.getvalue())
    print(f"preview: {a.file} -> {a.out} ({a.size}x{a.size}, 8-bit grayscale, MONOCHROME2)")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="local single-node test mode: synth -> prepare -> train -> predict")
    p.add_argument("--out", default="xray-dist-demo")
    p.add_argument("--num-cpus", type=int, default=None)


def cmd_demo(a) -> int:
    from xray_dist.demo import run_demo

    if storage.is_uri(a.out):
        raise ValueError(f"--out {a.out}: the demo is the local single-node test mode; give it a local directory")
    run_demo(a.out, num_cpus=a.num_cpus)
    return 0


def _add_train_flags(p, sweep: bool = False) -> None:
    """Flags of ``train`` (and ``jobs/train.py``); unset flags fall back to --config, then TrainConfig.

    For ``tune`` (``sweep=True``) --num-classes, --unfreeze-blocks and --lr take lists to search.
    """
    S = argparse.SUPPRESS
    p.add_argument("--cache", default=S, help="cache directory from `xray-dist prepare`")
    p.add_argument("--out", default=S, help="run directory (rerun with the same one to resume)")
    p.add_argument("--epochs", type=int, default=S)
    p.add_argument("--batch-size", type=int, default=S, help="per replica (global = this x replicas)")
    if sweep:
        p.add_argument("--lr", default=S, help="MIN,MAX: learning rate searched log-uniformly")
        p.add_argument("--num-classes", default=S, help="class scheme sizes to search, e.g. 2,4")
        p.add_argument("--unfreeze-blocks", default=S, help="unfreeze depths to search, e.g. 0,1,2")
        p.add_argument("--head-widths", default=S, help="head widths to search, e.g. 0,64,256")
    else:
        p.add_argument("--lr", type=float, default=S)
        p.add_argument("--head-width", type=int, default=S, help="hidden Dense units in the head (0 = none)")
        p.add_argument("--num-classes", type=int, default=S, help="class scheme size K (default: every label)")
        p.add_argument("--unfreeze-blocks", type=int, default=S, help="top VGG16 blocks that train (0-5)")
    p.add_argument("--dropout", type=float, default=S)
    p.add_argument("--negative-class", default=S)
    p.add_argument("--task", choices=["auto", "multiclass", "multilabel"], default=S,
                   help="multilabel: one sigmoid output per finding (K = --num-classes most frequent findings); "
                        "auto: multilabel when the cache's labels hold several findings per image")
    p.add_argument("--weights", default=S, help="imagenet | none | PATH to VGG16 no-top .h5")
    p.add_argument("--num-workers", type=int, default=S)
    p.add_argument("--gpus-per-worker", type=int, default=S)
    p.add_argument("--cpus-per-worker", type=float, default=S)
    p.add_argument("--cpu-replicas", type=int, default=S, help="split the CPU into N logical devices (no GPU)")
    p.add_argument("--placement-strategy", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"], default=S)
    p.add_argument("--mixed-precision", choices=["auto", "on", "off"], default=S)
    p.add_argument("--max-failures", type=int, default=S)
    p.add_argument("--worker-cache-mb", type=int, default=S,
                   help="keep each worker's training rows in memory after epoch 1 (0: stream every epoch)")
    p.add_argument("--seed", type=int, default=S)
    p.add_argument("--address", default=S, help="Ray address (default: RAY_ADDRESS, else embedded local Ray)")
    p.add_argument("--config", default=None, help="YAML file of flag values")


#: argparse's own entries, never configuration.
_CLI_ONLY = {"command", "verbose", "config"}


def _source(a) -> str:
    return f"--config {a.config} / command line" if a.config else "command line"


def train_config_from_args(a) -> "TrainConfig":
    from xray_dist.config import TrainConfig, coerce, load_yaml_overrides

    values = load_yaml_overrides(a.config)
    unknown = set(values) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"--config {a.config}: unknown keys {sorted(unknown)} (keys are the flag names of "
                         "`xray-dist train`)")
    values.update({k: v for k, v in vars(a).items() if k in TrainConfig.__dataclass_fields__})
    for required in ("cache", "out"):
        if required not in values:
            raise ValueError(f"--{required} is required (on the command line or in --config)")
    return TrainConfig(**coerce(TrainConfig, values, _source(a)))


def _add_train(sub) -> None:
    _add_train_flags(sub.add_parser("train", help="fine-tune VGG16 on a prepared cache with Ray Train"))


def cmd_train(a) -> int:
    from xray_dist.train import train

    res = train(train_config_from_args(a))
    m = res.metrics
    print(f"train: best epoch {m['best_epoch']}/{m['epochs']}: val_auc {m['val_auc']:.3f}, "
          f"val_auc_abnormal {m['val_auc_abnormal']:.3f}, sensitivity {m['sensitivity']:.2f}, "
          f"specificity {m['specificity']:.2f}, {m['images_per_s']:.1f} images/s; classes {m['classes']}")
    print(f"  run: {res.out} (metrics.json, history.csv, training_curves.png, roc.png, model/)")
    return 0


def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="Ray Tune sweep over head width x classes x unfreeze depth (x lr)")
    _add_train_flags(p, sweep=True)
    S = argparse.SUPPRESS
    p.add_argument("--num-samples", type=int, default=S, help="grid: repeats of the grid; random: trials")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default=S)
    p.add_argument("--search", choices=["grid", "random", "optuna"], default=S)
    p.add_argument("--max-concurrent", type=int, default=S, help="default: what the cluster's resources allow")
    p.add_argument("--grace-period", type=int, default=S, help="ASHA: epochs every trial runs before it may be stopped")
    p.add_argument("--workers-per-trial", type=int, default=S)
    p.add_argument("--trial-runner", choices=["auto", "inprocess", "train"], default=S,
                   help="auto (default): one-worker trials train inside their Tune process, which Tune reuses; "
                        "train: every trial is a Ray Train run (always so with several workers per trial)")
    p.add_argument("--combos", default=S, help="explicit W:K:D triples instead of the full grid, e.g. 0:2:0,64:4:1")
    p.add_argument("--resume-errored", action="store_true", default=S,
                   help="when resuming a sweep, run its failed trials again")
    p.add_argument("--no-shared-features", action="store_true", default=S,
                   help="recompute the frozen base in every trial (for comparison)")


def _values(v, cast, key: str, source: str) -> tuple:
    """A list flag (``0,64,256``, or a YAML list) as a tuple of ``cast``; an error names the key."""
    items = v if isinstance(v, (list, tuple)) else [x for x in str(v).split(",") if x.strip()]
    try:
        out = tuple(cast(x.strip() if isinstance(x, str) else x) for x in items)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {key}: expected a comma-separated list of {cast.__name__}, got {v!r}") from None
    if not out:
        raise ValueError(f"{source}: {key}: expected at least one value, got {v!r}")
    return out


#: ``tune``'s own keys (beside every ``train`` key).
SWEEP_KEYS = {"head_widths", "num_classes", "unfreeze_blocks", "lr", "workers_per_trial", "num_samples", "scheduler",
              "search", "max_concurrent", "grace_period", "trial_runner", "combos", "no_shared_features",
              "resume_errored"}


def sweep_config_from_args(a):
    from xray_dist.config import SweepConfig, TrainConfig, coerce, load_yaml_overrides

    raw = load_yaml_overrides(a.config)
    unknown = set(raw) - set(TrainConfig.__dataclass_fields__) - SWEEP_KEYS
    if unknown:
        raise ValueError(f"--config {a.config}: unknown keys {sorted(unknown)} (keys are the flag names of "
                         "`xray-dist tune`)")
    raw.update({k: v for k, v in vars(a).items() if k not in _CLI_ONLY})
    source = _source(a)
    sweep_kw = {}
    for key, cast in (("head_widths", int), ("num_classes", int), ("unfreeze_blocks", int)):
        if key in raw:
            sweep_kw[key] = _values(raw.pop(key), cast, key, source)
    if "lr" in raw:
        lr = _values(raw.pop("lr"), float, "lr", source)
        sweep_kw["lr"] = (lr[0], lr[-1])
    if "workers_per_trial" in raw:
        raw["num_workers"] = raw.pop("workers_per_trial")
    scalars = {k: raw.pop(k) for k in ("num_samples", "scheduler", "search", "max_concurrent", "grace_period",
                                        "trial_runner", "resume_errored") if k in raw}
    sweep_kw.update(coerce(SweepConfig, scalars, source))
    if "combos" in raw:
        text = raw.pop("combos")
        combos = []
        for c in (text if isinstance(text, (list, tuple)) else str(text).split(",")):
            parts = str(c).strip().split(":")
            try:
                combos.append(tuple(int(v) for v in parts))
            except ValueError:
                raise ValueError(f"{source}: combos: expected W:K:D triples of integers, got {c!r}") from None
        sweep_kw["combos"] = tuple(combos)
    if raw.pop("no_shared_features", False):
        sweep_kw["shared_features"] = False
    base = {k: v for k, v in raw.items() if k in TrainConfig.__dataclass_fields__}
    for required in ("cache", "out"):
        if required not in base:
            raise ValueError(f"--{required} is required (on the command line or in --config)")
    return SweepConfig(base=TrainConfig(**coerce(TrainConfig, base, source)), out=base["out"], **sweep_kw)


def cmd_tune(a) -> int:
    from xray_dist.tune import sweep

    s = sweep(sweep_config_from_args(a))
    print(f"tune: {s['trials']} trials ({s['completed']} completed, {s['stopped_early']} stopped early, "
          f"{s['failed']} failed) in {s['seconds']:.0f} s")
    if "best" in s:
        b = s["best"]
        print(f"  best: {b['config']} val_auc_abnormal {b['metrics']['val_auc_abnormal']:.3f} -> model {b['model']}")
    if not s["completed"]:
        print("xray-dist tune: error: no trial completed, so there is no best model (see results.csv's error "
              "column)", file=sys.stderr)
        return 1
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="class probabilities for DICOM files with a trained run")
    p.add_argument("inputs", nargs="+", help="DICOM files or directories")
    p.add_argument("--model", required=True, help="a run directory from `xray-dist train`")
    p.add_argument("--out", required=True, help="CSV to write (local path or URI)")
    p.add_argument("--engine", choices=["auto", "local", "ray"], default="auto",
                   help="local: score in this process; ray: Ray Data batch inference (decode in CPU tasks, model in "
                        "an actor pool, GPUs when present); auto: ray for object-store inputs or 256+ files")
    p.add_argument("--address", help="Ray address for --engine ray (default: RAY_ADDRESS, else embedded local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs for embedded local Ray (default: all)")
    _add_path_flags(p, "the CSV and the log", salt=True)


def cmd_predict(a) -> int:
    from xray_dist.predict import predict_files

    rows = predict_files(a.model, a.inputs, a.out, engine=a.engine, address=a.address, num_cpus=a.num_cpus,
                         names=_path_names(a), path_map=a.path_map)
    bad = sum(1 for r in rows if r["error"])
    print(f"predict: {len(rows) - bad} files scored, {bad} unreadable (see the error column) -> {a.out}")
    return 0


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="Grad-CAM heatmaps: where the model looks, per input file")
    p.add_argument("inputs", nargs="+", help="DICOM files or directories")
    p.add_argument("--model", required=True, help="a run directory from `xray-dist train` (or a sweep trial)")
    p.add_argument("--out", required=True, help="directory for <name>.png, <name>.npy and explain.csv")
    p.add_argument("--class", dest="class_name", default=None,
                   help="class name or index to explain (default: the predicted class)")
    _add_path_flags(p, "explain.csv, the image file names and titles, and the log", salt=True)


def cmd_explain(a) -> int:
    from xray_dist.explain import explain_files

    rows = explain_files(a.model, a.inputs, a.out, a.class_name, names=_path_names(a), path_map=a.path_map)
    bad = [r for r in rows if r["error"]]
    print(f"explain: {len(rows) - len(bad)} heatmaps, {len(bad)} unreadable -> {a.out}")
    for r in bad:
        print(f"  {r['path']}: {r['error']}", file=sys.stderr)
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML report for a run or a sweep")
    p.add_argument("target", help="a run directory (xray-dist train) or a sweep directory (xray-dist tune)")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--bootstrap", type=_at_least(1), default=1000, help="bootstrap resamples for the intervals")


def cmd_report(a) -> int:
    from xray_dist.report import write_report

    path = write_report(a.target, a.out, n_boot=a.bootstrap)
    print(f"report: {storage.absolute(path)}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="a serving model: cached-format image in, class probabilities out")
    p.add_argument("--model", required=True, help="a run directory from `xray-dist train` (or a sweep trial)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--format", choices=["savedmodel", "keras"], default="savedmodel")


def cmd_export(a) -> int:
    from xray_dist.export import export_model

    path = export_model(a.model, a.out, a.format)
    print(f"export: {a.format} -> {path} (with model_spec.json and serving.json)")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score a held-out split once, with patient-level 95 % intervals")
    p.add_argument("--model", required=True, help="a run directory, or a sweep directory (its best trial)")
    p.add_argument("--cache", required=True, help="the cache the model was trained with")
    p.add_argument("--split", default="test", help="test (default) or val (optimistic: used for selection)")
    p.add_argument("--out", help="directory to write (default: MODEL/evaluation/SPLIT, where report finds it)")
    p.add_argument("--bootstrap", type=_at_least(100), default=1000, help="patient resamples for the intervals")


def cmd_evaluate(a) -> int:
    from xray_dist.evaluate import evaluate_model

    m = evaluate_model(a.model, a.cache, a.split, a.out, a.bootstrap)

    def ci(k):
        v, (lo, hi) = m[k]["value"], m[k]["ci95"]
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"

    print(f"evaluate: {m['split']} split, {m['images']} images of {m['patients']} patients"
          + (" (OPTIMISTIC: validation chose the model and threshold)" if m["optimistic"] else ""))
    print(f"  AUROC abnormal {ci('auc_abnormal')}; at threshold {m['threshold']:.3f}: sensitivity "
          f"{ci('sensitivity')}, specificity {ci('specificity')}")
    print(f"  95 % intervals: patient-level bootstrap ({a.bootstrap} resamples) -> {m['out']}")
    return 0


COMMANDS = {
    "prepare": (_add_prepare, cmd_prepare),
    "synth": (_add_synth, cmd_synth),
    "preview": (_add_preview, cmd_preview),
    "train": (_add_train, cmd_train),
    "predict": (_add_predict, cmd_predict),
    "tune": (_add_tune, cmd_tune),
    "explain": (_add_explain, cmd_explain),
    "evaluate": (_add_evaluate, cmd_evaluate),
    "report": (_add_report, cmd_report),
    "export": (_add_export, cmd_export),
    "demo": (_add_demo, cmd_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xray-dist", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("openjpeg").setLevel(logging.WARNING)
    try:
        return COMMANDS[a.command][1](a)
    except (XrayDistError, ValueError) as e:
        print(f"xray-dist {a.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
