"""``xray-dist`` subcommands. Thin: parse flags, build one config, call one function, print."""

from __future__ import annotations

import argparse
import io
import logging
import re
import sys

from typing import TYPE_CHECKING

from xray_dist.infra import storage
from xray_dist.config import DEFAULT_MAX_PIXELS
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
    p = _command(sub, "prepare", "decode DICOMs once into a Parquet cache with a patient-level split",
                 "Reads every labelled DICOM file once (in parallel Ray tasks), writes the model inputs to a Parquet "
                 "cache, splits patients into train/val/test, and lists every file it could not use, with the reason.")
    p.add_argument("data_dir", help="directory or object-store prefix (s3://...) holding the DICOM files")
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
    p.add_argument("--path-column", default="path", help="csv format: the column naming each file")
    p.add_argument("--label-column", default="label", help="csv format: the column holding each file's label")
    p.add_argument("--patient-column", default=None,
                   help="csv format: the column naming each image's patient (hashed like header IDs; default: "
                        "the DICOM Patient ID, else the Study Instance UID, else the file)")
    p.add_argument("--out", required=True, help="cache directory (local or object store)")
    p.add_argument("--image-size", type=int, default=224, help="model input size in pixels (square)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse (quarantine as too_large) a file whose header declares more pixels than this, before "
                        "decoding it (rows x columns x frames x samples)")
    p.add_argument("--keep-burned-in", action="store_true",
                   help="use images whose (0028,0301) Burned In Annotation is YES (default: quarantined)")
    p.add_argument("--salt-file", help="file or URI holding the patient-key salt, never inside the cache (made, "
                                       "0600, when missing; default: XRAY_DIST_SALT, else ~/.config/xray-dist/salt)")
    _add_path_flags(p, "the cache and its report")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of patients (per label) for validation")
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="share of patients (per label) held out for `xray-dist evaluate`")
    p.add_argument("--split-file", action="append", default=[],
                   help="official splits: a CSV of path or patient plus split (train/val/test/train_val), or a "
                        "list of file names named for its split (test_list.txt, train_val_list.txt); repeatable. "
                        "Fixes those splits; validation is drawn from train_val and from files it does not name")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient split")
    _add_ray_flags(p)


def cmd_prepare(a) -> int:
    from xray_dist.config import PrepareConfig, PreprocessSpec
    from xray_dist.data.prepare import prepare

    cfg = PrepareConfig(
        data_dir=a.data_dir, out=a.out, labels=a.labels, path_column=a.path_column, label_column=a.label_column,
        patient_column=a.patient_column, labels_format=a.labels_format, uncertain=a.uncertain, metadata=a.metadata,
        views=tuple(v.strip().upper() for v in a.views.split(",") if v.strip()),
        preprocess=PreprocessSpec(image_size=a.image_size, burned_in="keep" if a.keep_burned_in else "reject",
                                  max_pixels=a.max_pixels),
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
        "  splits:  " + ", ".join(f"{k}={v['images']} images/{v['patients']} patients" for k, v in report["splits"].items())
        + (f" (split fingerprint {report['split_fingerprint']}, seed {report['split_settings']['seed']})"
           if report.get("split_fingerprint") else ""),
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


def _add_ray_flags(p) -> None:
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else embedded local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs for embedded local Ray (default: all)")


def _add_path_flags(p, where: str, salt: bool = False) -> None:
    p.add_argument("--redact-paths", action="store_true",
                   help=f"name files in {where} by a salted key instead of their relative path (xray_dist.data.paths)")
    p.add_argument("--path-map", help="with --redact-paths: CSV to write key,path to (keep it private; never inside "
                                      "the outputs)")
    if salt:
        p.add_argument("--salt-file", help="with --redact-paths: the salt (made, 0600, when missing; default: "
                                           "XRAY_DIST_SALT, else ~/.config/xray-dist/salt, as prepare's); give "
                                           "prepare's salt to get the cache's keys")


def _path_names(a):
    """:class:`~xray_dist.data.paths.PathNames` from predict/explain flags."""
    from xray_dist.errors import XrayDistError
    from xray_dist.data.paths import REDACT, RELATIVE, PathNames
    from xray_dist.data.salt import resolve as resolve_salt

    if a.path_map and not a.redact_paths:
        raise XrayDistError("--path-map is written with --redact-paths only")
    if not a.redact_paths:
        return PathNames(RELATIVE)
    return PathNames(REDACT, resolve_salt(a.salt_file))  # the lookup prepare uses: the same keys by default


def _add_synth(sub) -> None:
    p = _command(sub, "synth", "write synthetic chest-like radiographs as DICOM files + labels.csv",
                 "Synthetic radiographs in every encoding the reader handles (MONOCHROME1/2, rescale, windowing, "
                 "RLE, JPEG 2000...), one finding per class, to try the whole flow without patient data.")
    p.add_argument("out", help="directory (or object-store prefix) to write")
    p.add_argument("--patients", type=int, default=40, help="number of patients (one class each)")
    p.add_argument("--images-per-patient", type=int, default=2, help="images per patient")
    p.add_argument("--classes", default="normal,finding", help="comma-separated class names; the first has no finding")
    p.add_argument("--size", type=int, default=256, help="image size in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed")


def cmd_synth(a) -> int:
    from xray_dist.data.synth import synthesize

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
    p = _command(sub, "preview", "write a PNG of exactly what the model sees for one DICOM file",
                 "Reads one DICOM file as prepare and predict do (rescale, window, MONOCHROME1, padding, resize).")
    p.add_argument("file", help="a DICOM file (local or URI)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--size", type=int, default=224, help="model input size in pixels")


def cmd_preview(a) -> int:
    from PIL import Image

    from xray_dist.config import PreprocessSpec
    from xray_dist.data.dicom import load_image

    img = load_image(a.file, PreprocessSpec(image_size=a.size))
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG")
    storage.write_bytes(a.out, buf.getvalue())
    print(f"preview: {a.file} -> {a.out} ({a.size}x{a.size}, 8-bit grayscale, MONOCHROME2)")
    return 0


def _add_demo(sub) -> None:
    p = _command(sub, "demo", "local single-node test mode: synth -> prepare -> train -> evaluate -> ... -> report",
                 "The whole flow on this machine's CPUs in about two minutes, on synthetic DICOM files.")
    p.add_argument("--out", default="xray-dist-demo", help="directory for everything the demo writes")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for embedded local Ray (default: all)")


def cmd_demo(a) -> int:
    from xray_dist.cli.demo import run_demo

    if storage.is_uri(a.out):
        raise ValueError(f"--out {a.out}: the demo is the local single-node test mode; give it a local directory")
    run_demo(a.out, num_cpus=a.num_cpus)
    return 0


def _add_train_flags(p, sweep: bool = False) -> None:
    """Flags of ``train`` (and ``jobs/train.py``); unset flags fall back to --config, then TrainConfig.

    For ``tune`` (``sweep=True``) --num-classes, --unfreeze-blocks and --lr take lists to search.
    """
    S = argparse.SUPPRESS

    def d(name: str) -> str:  # the TrainConfig default, shown in --help (the flags default to "unset")
        from xray_dist.config import TrainConfig

        return f" (default: {TrainConfig.__dataclass_fields__[name].default})"

    p.add_argument("--cache", default=S, help="cache directory from `xray-dist prepare` (required)")
    p.add_argument("--out", default=S, help="run directory; rerun with the same one to resume (required)")
    p.add_argument("--epochs", type=int, default=S, help="epochs to train" + d("epochs"))
    p.add_argument("--batch-size", type=int, default=S, help="per replica; global = this x replicas" + d("batch_size"))
    if sweep:
        p.add_argument("--lr", default=S, help="MIN,MAX: learning rate searched log-uniformly (default: 1e-4,1e-4)")
        p.add_argument("--num-classes", default=S, help="class scheme sizes (multi-label: numbers of findings) to "
                                                        "search, e.g. 2,4 (default: 2)")
        p.add_argument("--unfreeze-blocks", default=S, help="unfreeze depths to search, e.g. 0,1,2 (default: 0,1,2)")
        p.add_argument("--head-widths", default=S, help="head widths to search, e.g. 0,64,256 (default: 0,64,256)")
    else:
        p.add_argument("--lr", type=float, default=S, help="Adam learning rate" + d("lr"))
        p.add_argument("--head-width", type=int, default=S, help="hidden Dense units in the head, 0 = none"
                       + d("head_width"))
        p.add_argument("--num-classes", type=int, default=S,
                       help="class scheme size K, or (multi-label) the K most frequent findings (default: all)")
        p.add_argument("--unfreeze-blocks", type=int, default=S, help="top VGG16 blocks that train, 0-5"
                       + d("unfreeze_blocks"))
    p.add_argument("--dropout", type=float, default=S, help="dropout after the hidden head layer" + d("dropout"))
    p.add_argument("--negative-class", default=S, help="the label that means no finding" + d("negative_class"))
    p.add_argument("--task", choices=["auto", "multiclass", "multilabel"], default=S,
                   help="multilabel: one sigmoid output per finding (K = --num-classes most frequent findings); "
                        "auto: multilabel when the cache's labels hold several findings per image" + d("task"))
    p.add_argument("--weights", default=S, help="VGG16 base weights: imagenet, none (random) or PATH/URI of the "
                                                "no-top .h5" + d("weights"))
    p.add_argument("--num-workers", type=int, default=S, help="Ray Train workers" + d("num_workers"))
    p.add_argument("--gpus-per-worker", type=int, default=S, help="GPUs each worker mirrors over"
                   + d("gpus_per_worker"))
    p.add_argument("--cpus-per-worker", type=float, default=S,
                   help="CPUs each worker reserves (default: 0.5 without GPUs, leaving Ray Data room; 1 with GPUs)")
    p.add_argument("--cpu-replicas", type=int, default=S, help="split the CPU into N logical devices (no GPU)"
                   + d("cpu_replicas"))
    p.add_argument("--placement-strategy", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"], default=S,
                   help="how Ray places the workers (STRICT_SPREAD: one per node)" + d("placement_strategy"))
    p.add_argument("--mixed-precision", choices=["auto", "on", "off"], default=S,
                   help="auto: bf16/fp16 on GPU, fp32 on CPU" + d("mixed_precision"))
    p.add_argument("--max-failures", type=int, default=S, help="worker failures survived by resuming from the last "
                                                               "checkpoint" + d("max_failures"))
    p.add_argument("--worker-cache-mb", type=int, default=S,
                   help="memory per worker for its training rows, read once (0: stream every epoch)"
                   + d("worker_cache_mb"))
    p.add_argument("--seed", type=int, default=S, help="seed of weights, dropout and data order" + d("seed"))
    p.add_argument("--address", default=S, help="Ray address (default: RAY_ADDRESS, else embedded local Ray)")
    p.add_argument("--mlflow", default=S, help="MLflow tracking URI: each run (each sweep trial) is logged there, "
                                               "with no path or patient data (default: MLFLOW_TRACKING_URI, else "
                                               "none); needs pip install 'xray-dist[mlflow]'")
    p.add_argument("--config", default=None, help="YAML file of flag values; flags on the command line win "
                                                  "(default: none)")


#: argparse's own entries, never configuration.
_CLI_ONLY = {"command", "verbose", "quiet", "config"}


def _source(a) -> str:
    return f"--config {a.config} / command line" if a.config else "command line"


def _check_config_keys(values, command: str, config: str | None) -> None:
    """A ``--config`` file holds flags of ``command`` and nothing else (not every config field is a
    flag): an unknown key is refused, naming the nearest flags."""
    from xray_dist.config import check_keys

    sub = argparse.ArgumentParser().add_subparsers()
    COMMANDS[command][0](sub)
    # argparse lists a parser's flags only in ``_actions`` (unchanged since Python 2.7; no public accessor)
    flags = {action.dest for action in sub.choices[command]._actions} - _CLI_ONLY - {"help"}
    check_keys(values, flags, f"--config {config}", command)


def train_config_from_args(a) -> "TrainConfig":
    from xray_dist.config import TrainConfig, coerce, load_yaml_overrides

    values = load_yaml_overrides(a.config)
    _check_config_keys(values, "train", a.config)
    values.update({k: v for k, v in vars(a).items() if k in TrainConfig.__dataclass_fields__})
    for required in ("cache", "out"):
        if required not in values:
            raise ValueError(f"--{required} is required (on the command line or in --config)")
    return TrainConfig(**coerce(TrainConfig, values, _source(a)))


def _add_train(sub) -> None:
    _add_train_flags(_command(sub, "train", "fine-tune VGG16 on a prepared cache with Ray Train",
                              "Data-parallel fine-tuning (MultiWorkerMirroredStrategy between workers, all GPUs of a "
                              "worker) with checkpoints every epoch; a rerun with the same --out resumes exactly."))


def cmd_train(a) -> int:
    from xray_dist.training.driver import train

    res = train(getattr(a, "cfg", None) or train_config_from_args(a))
    m = res.metrics
    print(f"train: best epoch {m['best_epoch']}/{m['epochs']}: val_auc {m['val_auc']:.3f}, "
          f"val_auc_abnormal {m['val_auc_abnormal']:.3f}, sensitivity {m['sensitivity']:.2f}, "
          f"specificity {m['specificity']:.2f}, {m['images_per_s']:.1f} images/s; classes {m['classes']}")
    print(f"  run: {res.out} (metrics.json, history.csv, training_curves.png, roc.png, model/)")
    return 0


def _add_tune(sub) -> None:
    p = _command(sub, "tune", "Ray Tune sweep over head width x classes x unfreeze depth (x lr)",
                 "Searches head width x number of classes (or findings) x unfreeze depth (x learning rate) with Ray "
                 "Tune; trials share the frozen base's features, ASHA stops weak ones early, and the best trial's "
                 "model is written with the results table.")
    _add_train_flags(p, sweep=True)
    S = argparse.SUPPRESS
    p.add_argument("--num-samples", type=int, default=S, help="grid: repeats of the grid; random/optuna: trials "
                                                              "(default: 1)")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default=S, help="asha stops weak trials early "
                                                                            "(default: asha)")
    p.add_argument("--search", choices=["grid", "random", "optuna"], default=S, help="how trials are chosen "
                                                                                     "(default: grid)")
    p.add_argument("--max-concurrent", type=int, default=S, help="trials at once (default: what the cluster's "
                                                                 "resources allow)")
    p.add_argument("--grace-period", type=int, default=S, help="ASHA: epochs every trial runs before it may be "
                                                               "stopped (default: 1)")
    p.add_argument("--workers-per-trial", type=int, default=S, help="Ray Train workers per trial (default: 1)")
    p.add_argument("--trial-runner", choices=["auto", "inprocess", "train"], default=S,
                   help="auto: one-worker trials train inside their Tune process, which Tune reuses; "
                        "train: every trial is a Ray Train run (always so with several workers per trial) "
                        "(default: auto)")
    p.add_argument("--combos", default=S, help="explicit W:K:D triples instead of the full grid, e.g. 0:2:0,64:4:1 "
                                               "(default: the full grid)")
    p.add_argument("--resume-errored", action="store_true", default=S,
                   help="when resuming a sweep, run its failed trials again (default: off)")
    p.add_argument("--no-shared-features", action="store_true", default=S,
                   help="recompute the frozen base in every trial, for comparison (default: off)")


def _values(v, cast, key: str, source: str) -> tuple:
    """A list flag (``0,64,256``, or a YAML list) as a tuple of ``cast``; an error names the key."""
    from xray_dist.config import ConfigError, coerce_scalar

    items = v if isinstance(v, (list, tuple)) else [x for x in str(v).split(",") if x.strip()]
    try:
        out = tuple(coerce_scalar(cast, x) for x in items)  # no bools, no 2.5 cut to 2; ranges: SweepConfig
    except (TypeError, ValueError):
        raise ConfigError(key, f"{source}: {key}: expected a comma-separated list of {cast.__name__}, "
                               f"got {v!r}") from None
    if not out:
        raise ConfigError(key, f"{source}: {key}: expected at least one value, got {v!r}")
    return out


#: ``tune``'s own keys (beside every ``train`` key).
SWEEP_KEYS = {"head_widths", "num_classes", "unfreeze_blocks", "lr", "workers_per_trial", "num_samples", "scheduler",
              "search", "max_concurrent", "grace_period", "trial_runner", "combos", "no_shared_features",
              "resume_errored"}


def sweep_config_from_args(a):
    from xray_dist.config import SweepConfig, TrainConfig, coerce, load_yaml_overrides

    raw = load_yaml_overrides(a.config)
    _check_config_keys(raw, "tune", a.config)
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
    from xray_dist.training.tune import sweep

    cfg = getattr(a, "cfg", None) or sweep_config_from_args(a)
    s = sweep(cfg)
    print(f"tune: {s['trials']} trials ({s['completed']} completed, {s['stopped_early']} stopped early, "
          f"{s['failed']} failed) in {s['seconds']:.0f} s")
    print(format_sweep_table(storage.join(storage.absolute(cfg.out), "results.csv")))
    if "best" in s:
        b = s["best"]
        print(f"  best: {b['config']} val_auc_abnormal {b['metrics']['val_auc_abnormal']:.3f} -> model {b['model']}")
    if not s["completed"]:
        print("xray-dist tune: error: no trial completed, so there is no best model (see results.csv's error "
              "column)", file=sys.stderr)
        return 1
    return 0


def format_sweep_table(results_csv: str, top: int = 10) -> str:
    """The sweep's trials as a small table, best first (the whole table is results.csv)."""
    import csv
    import math

    rows = list(csv.DictReader(io.StringIO(storage.read_text(results_csv), newline="")))

    def score(r):
        try:
            v = float(r["val_auc_abnormal"])
        except ValueError:
            return -math.inf
        return -math.inf if math.isnan(v) else v

    rows.sort(key=score, reverse=True)
    head = f"  {'W':>5} {'K':>3} {'D':>2} {'lr':>8} {'status':<14} {'epochs':>6} {'val_auc_abnormal':>16}"
    lines = [head]
    for r in rows[:top]:
        v = score(r)
        lines.append(f"  {r['head_width']:>5} {r['num_classes']:>3} {r['unfreeze_blocks']:>2} "
                     f"{float(r['lr']):>8.1e} {r['status']:<14} {r['epochs']:>6} "
                     f"{'' if v == -math.inf else f'{v:.3f}':>16}")
    if len(rows) > top:
        lines.append(f"  ... {len(rows) - top} more in {results_csv}")
    return "\n".join(lines)


def _add_predict(sub) -> None:
    p = _command(sub, "predict", "class probabilities for DICOM files with a trained run",
                 "One CSV row per input file: each class's (or finding's) probability, the abnormal score and "
                 "decision, or the reason a file could not be read.")
    p.add_argument("inputs", nargs="+", help="DICOM files, directories or object-store prefixes")
    p.add_argument("--model", required=True, help="a run directory from `xray-dist train` (or a sweep trial)")
    p.add_argument("--out", required=True, help="CSV to write (local path or URI)")
    p.add_argument("--engine", choices=["auto", "local", "ray"], default="auto",
                   help="local: score in this process; ray: Ray Data batch inference (decode in CPU tasks, model in "
                        "an actor pool, GPUs when present); auto: ray for object-store inputs or 256+ files")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call")
    _add_ray_flags(p)
    _add_path_flags(p, "the CSV and the log", salt=True)


def cmd_predict(a) -> int:
    from xray_dist.inference.predict import predict_files

    rows = predict_files(a.model, a.inputs, a.out, batch_size=a.batch_size, engine=a.engine, address=a.address,
                         num_cpus=a.num_cpus,
                         names=_path_names(a), path_map=a.path_map)
    bad = sum(1 for r in rows if r["error"])
    print(f"predict: {len(rows) - bad} files scored, {bad} unreadable (see the error column) -> {a.out}")
    if bad == len(rows):
        print(f"xray-dist predict: error: {'none of the %d files could be scored' % bad if rows else 'no input files'}",
              file=sys.stderr)
        return 1
    return 0


def _add_explain(sub) -> None:
    p = _command(sub, "explain", "Grad-CAM heatmaps: where the model looks, per input file",
                 "For each input: the model input with a Grad-CAM heatmap over it (PNG), the heatmap (.npy), and a "
                 "row in explain.csv (or the reason the file could not be read).")
    p.add_argument("inputs", nargs="+", help="DICOM files or directories")
    p.add_argument("--model", required=True, help="a run directory from `xray-dist train` (or a sweep trial)")
    p.add_argument("--out", required=True, help="directory for <name>.png, <name>.npy and explain.csv")
    p.add_argument("--class", dest="class_name", default=None,
                   help="class (or finding) name, finding key or index to explain (default: the predicted class, "
                        "or the most probable finding)")
    _add_path_flags(p, "explain.csv, the image file names and titles, and the log", salt=True)


def cmd_explain(a) -> int:
    from xray_dist.inference.explain import explain_files

    rows = explain_files(a.model, a.inputs, a.out, a.class_name, names=_path_names(a), path_map=a.path_map)
    bad = [r for r in rows if r["error"]]
    print(f"explain: {len(rows) - len(bad)} heatmaps, {len(bad)} unreadable (see explain.csv) -> {a.out}")
    if len(bad) == len(rows):
        what = f"none of the {len(bad)} files could be explained" if rows else "no input files"
        print(f"xray-dist explain: error: {what}", file=sys.stderr)
        return 1
    return 0


def _add_report(sub) -> None:
    p = _command(sub, "report", "one self-contained HTML report for a run or a sweep",
                 "Held-out test numbers first (when evaluate has run), validation metrics with patient-level "
                 "intervals, curves, ROC, calibration and the dataset, in one HTML file.")
    p.add_argument("target", help="a run directory (xray-dist train) or a sweep directory (xray-dist tune)")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--bootstrap", type=_at_least(1), default=1000, help="bootstrap resamples for the intervals")


def cmd_report(a) -> int:
    from xray_dist.results.report import write_report

    path = write_report(a.target, a.out, n_boot=a.bootstrap)
    print(f"report: {storage.absolute(path)}")
    return 0


def _add_export(sub) -> None:
    p = _command(sub, "export", "a serving model: cached-format image in, class probabilities out",
                 "Writes a SavedModel (no xray-dist code needed to load it) or a .keras file, with serving.json.")
    p.add_argument("--model", required=True, help="a run directory from `xray-dist train` (or a sweep trial)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--format", choices=["savedmodel", "keras"], default="savedmodel", help="serving format")


def cmd_export(a) -> int:
    from xray_dist.inference.export import export_model

    path = export_model(a.model, a.out, a.format)
    print(f"export: {a.format} -> {path} (with model_spec.json and serving.json)")
    return 0


def _add_evaluate(sub) -> None:
    p = _command(sub, "evaluate", "score a held-out split once, with patient-level 95 % intervals",
                 "The numbers to report: the model (a run, or a sweep's best trial) scored once on patients that "
                 "took part in no choice, at the threshold chosen on validation.")
    p.add_argument("--model", required=True, help="a run directory, or a sweep directory (its best trial)")
    p.add_argument("--cache", required=True, help="the cache the model was trained with")
    p.add_argument("--split", default="test", help="test, or val (optimistic: used for selection)")
    p.add_argument("--out", help="directory to write (default: MODEL/evaluation/SPLIT, where report finds it)")
    p.add_argument("--bootstrap", type=_at_least(100), default=1000, help="patient resamples for the intervals")


def cmd_evaluate(a) -> int:
    from xray_dist.results.evaluate import evaluate_model

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


DESCRIPTION = """\
Fine-tune a VGG16 chest X-ray classifier on DICOM images — on this machine or on a Ray cluster.

  prepare   decode the DICOM files once into a cache, split patients, list every file not used
  train     fine-tune on the cache (Ray Train; resumable)      tune      search head x classes x depth
  evaluate  the numbers to report, on held-out patients        report    one HTML page of results
  predict   probabilities for new files     explain   Grad-CAM heatmaps     export    a serving model
  demo      all of it on synthetic data, in about two minutes

Run `xray-dist COMMAND --help` for a command's flags."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows every flag's default (unless its text already says it)."""

    def _get_help_string(self, action):
        text = re.sub(r"%(?!\()", "%%", action.help or "")  # "95 %" is text; "%(default)s" is a field
        if action.option_strings and not action.required and "default" not in text \
                and action.default is not argparse.SUPPRESS and not isinstance(action, argparse._VersionAction):
            d = action.default
            shown = ("none" if d is None or d == [] else "off" if d is False else "on" if d is True else
                     ",".join(map(str, d)) if isinstance(d, (list, tuple)) else d)
            text += f" (default: {str(shown).replace('%', '%%')})"
        return text


def _common() -> argparse.ArgumentParser:
    """-v/-q, accepted before the command and after it (so ``jobs/*.py`` take them too)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="also show what the log file gets: Ray, TensorFlow and per-step detail (default: off)")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="only warnings, errors and the final summary (default: off)")
    return p


def _command(sub, name: str, help: str, description: str):
    return sub.add_parser(name, help=help, description=f"{help[0].upper()}{help[1:]}.\n\n{description}",
                          parents=[_common()], formatter_class=_Formatter)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xray-dist")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xray-dist", description=DESCRIPTION, formatter_class=_Formatter,
                                     parents=[_common()])
    parser.add_argument("--version", action="version", version=f"xray-dist {_version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


#: Commands whose log file lives in the directory they write (a run, a sweep, the demo).
_LOG_IN_OUT = {"train", "tune", "demo"}
#: Commands that load TensorFlow in this process.
_USES_TENSORFLOW = {"train", "tune", "demo", "predict", "explain", "export", "evaluate"}


#: Flags naming input locations, which can carry a patient's name (``/data/SMITH_JOHN/labels.csv``):
#: with --redact-paths, every form of them is replaced by its placeholder in what is printed and logged.
_INPUT_LOCATIONS = {"data_dir": "<data>", "labels": "<labels>", "metadata": "<metadata>",
                    "split_file": "<split-file>", "inputs": "<input>"}


def _protect_inputs(a) -> None:
    """--redact-paths: the command's input locations go to :func:`xray_dist.infra.redaction.protect`."""
    from xray_dist.infra import redaction

    if not getattr(a, "redact_paths", False):
        return
    for attr, placeholder in _INPUT_LOCATIONS.items():
        value = getattr(a, attr, None)
        for location in value if isinstance(value, list) else [value] if value else []:
            redaction.protect(location, placeholder)


def main(argv: list[str] | None = None) -> int:
    from xray_dist.infra import console, redaction

    parser = build_parser()
    a = parser.parse_args(argv)
    level = console.VERBOSE if getattr(a, "verbose", False) else console.QUIET if getattr(a, "quiet", False) \
        else console.NORMAL
    _protect_inputs(a)
    console.setup(level, console.log_path_for(a.command, getattr(a, "out", None), a.command in _LOG_IN_OUT))
    try:
        if a.command in ("train", "tune"):  # a bad config stops in a second, before TensorFlow loads
            a.cfg = (train_config_from_args if a.command == "train" else sweep_config_from_args)(a)
        if a.command in _USES_TENSORFLOW:
            console.load_tensorflow()  # its native start-up lines go to the log, not the terminal
        return COMMANDS[a.command][1](a)
    except (XrayDistError, ValueError) as e:
        log.debug("%s failed", a.command, exc_info=True)
        print(f"xray-dist {a.command}: error: {redaction.scrub(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xray-dist {a.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug or an unforeseen failure: one line here, the traceback in the log
        if level >= console.VERBOSE and not redaction.protected():
            raise  # Python prints the traceback; with --redact-paths it is logged (cleaned) below instead
        log.log(logging.ERROR if level >= console.VERBOSE else logging.DEBUG, "%s failed", a.command, exc_info=True)
        where = console.log_file()
        print(f"xray-dist {a.command}: unexpected error: {type(e).__name__}: {redaction.scrub(str(e))}"
              + (f" (traceback in {where})" if where else ""), file=sys.stderr)
        return 1
    finally:
        console.finish()


if __name__ == "__main__":
    sys.exit(main())
