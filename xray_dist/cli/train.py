"""The training stage's commands: ``train`` (one run with Ray Train) and ``tune`` (a Ray Tune sweep).

Their flags default to "unset" so that a ``--config`` YAML file can set them; what neither sets
takes the config dataclass's default (:mod:`xray_dist.config`), which ``--help`` shows.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys

from xray_dist.cli.common import CLI_ONLY, command, default_help
from xray_dist.cli.results import calibrate_after_training
from xray_dist.config import (AUGMENT, PRECISIONS, PLACEMENT_STRATEGIES, SCHEDULERS, SEARCHES, TASKS, TRAIN_RUNNERS, TRIAL_RUNNERS,
                              ConfigError, SweepConfig, TrainConfig, check_keys, coerce, coerce_scalar,
                              load_yaml_overrides)
from xray_dist.infra import storage
from xray_dist.training.driver import train
from xray_dist.training.tune import sweep

#: ``--calibrate``: what happens to the probabilities once a run (a sweep's best trial) is trained.
CALIBRATIONS = ("none", "temperature")


def _add_train_flags(p, sweep: bool = False) -> None:
    """Flags of ``train`` (and ``jobs/train.py``); unset flags fall back to --config, then TrainConfig.

    For ``tune`` (``sweep=True``) --num-classes, --unfreeze-blocks and --lr take lists to search.
    """
    S = argparse.SUPPRESS

    def d(name: str) -> str:  # the TrainConfig default, shown in --help (the flags default to "unset")
        return default_help(TrainConfig, name)

    def sd(name: str) -> str:  # the same for a sweep's own fields
        return default_help(SweepConfig, name)

    p.add_argument("--cache", default=S, help="cache directory from `xray-dist prepare` (required)")
    p.add_argument("--out", default=S, help="run directory; rerun with the same one to resume (required)")
    p.add_argument("--epochs", type=int, default=S, help="epochs to train" + d("epochs"))
    p.add_argument("--batch-size", type=int, default=S, help="per replica; global = this x replicas" + d("batch_size"))
    if sweep:
        p.add_argument("--lr", default=S, help="MIN,MAX: learning rate searched log-uniformly" + sd("lr"))
        p.add_argument("--num-classes", default=S, help="class scheme sizes (multi-label: numbers of findings) to "
                                                        "search, e.g. 2,4" + sd("num_classes"))
        p.add_argument("--unfreeze-blocks", default=S, help="unfreeze depths to search, e.g. 0,1,2"
                       + sd("unfreeze_blocks"))
        p.add_argument("--head-widths", default=S, help="head widths to search, e.g. 0,64,256" + sd("head_widths"))
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
    p.add_argument("--task", choices=TASKS, default=S,
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
    p.add_argument("--placement-strategy", choices=PLACEMENT_STRATEGIES, default=S,
                   help="how Ray places the workers (STRICT_SPREAD: one per node)" + d("placement_strategy"))
    p.add_argument("--precision", choices=PRECISIONS, default=S,
                   help="what the model computes in (weights stay float32). auto: bfloat16 (compute capability 8+) "
                        "or float16 on GPUs, bfloat16 on CPUs with AMX or AVX-512 BF16, else float32; frozen "
                        "features are extracted in it too" + d("precision"))
    p.add_argument("--augment", choices=AUGMENT, default=S,
                   help="light: small rotation, scale, shift, brightness and contrast of training images, seeded "
                        "per (seed, epoch, image), no flip; for fine-tuning deep blocks on few images (frozen-feature "
                        "sharing is then off)" + d("augment"))
    p.add_argument("--max-failures", type=int, default=S, help="worker failures survived by resuming from the last "
                                                               "checkpoint" + d("max_failures"))
    if not sweep:
        p.add_argument("--runner", choices=TRAIN_RUNNERS, default=S,
                       help="train: Ray Train; inprocess: one worker in this process, for a quick local try (no "
                            "Ray Train controller or worker to start, no worker recovery); a rerun resumes with the "
                            "runner it started with" + d("runner"))
    p.add_argument("--worker-cache-mb", type=int, default=S,
                   help="memory per worker for its training rows, read once (0: stream every epoch)"
                   + d("worker_cache_mb"))
    p.add_argument("--seed", type=int, default=S, help="seed of weights, dropout and data order" + d("seed"))
    p.add_argument("--address", default=S, help="Ray address (default: RAY_ADDRESS, else embedded local Ray)")
    p.add_argument("--mlflow", default=S, help="MLflow tracking URI: each run (each sweep trial) is logged there, "
                                               "with no path or patient data (default: MLFLOW_TRACKING_URI, else "
                                               "none); needs pip install 'xray-dist[mlflow]'")
    p.add_argument("--calibrate", choices=CALIBRATIONS, default=S,
                   help="temperature: once trained, fit a temperature on validation and store it with the model "
                        + ("(the best trial's)" if sweep else "") + ", as `xray-dist calibrate` does (default: none)")
    p.add_argument("--config", default=None, help="YAML file of flag values; flags on the command line win "
                                                  "(default: none)")


def _source(a) -> str:
    return f"--config {a.config} / command line" if a.config else "command line"


def _check_config_keys(values, name: str, config: str | None) -> None:
    """A ``--config`` file holds flags of the command ``name`` and nothing else (not every config
    field is a flag): an unknown key is refused, naming the nearest flags."""
    sub = argparse.ArgumentParser().add_subparsers()
    {"train": add_train, "tune": add_tune}[name](sub)
    # argparse lists a parser's flags only in ``_actions`` (unchanged since Python 2.7; no public accessor)
    flags = {action.dest for action in sub.choices[name]._actions} - CLI_ONLY - {"help"}
    check_keys(values, flags, f"--config {config}", name)


def train_config_from_args(a) -> TrainConfig:
    """``train``'s config: the --config file's values, the flags given on top, TrainConfig's defaults."""
    values = load_yaml_overrides(a.config)
    _check_config_keys(values, "train", a.config)
    values.pop("calibrate", None)  # what happens after training (cmd_train), not a training setting
    values.update({k: v for k, v in vars(a).items() if k in TrainConfig.__dataclass_fields__})
    for required in ("cache", "out"):
        if required not in values:
            raise ValueError(f"--{required} is required (on the command line or in --config)")
    return TrainConfig(**coerce(TrainConfig, values, _source(a)))


def add_train(sub) -> None:
    _add_train_flags(command(sub, "train", "fine-tune VGG16 on a prepared cache with Ray Train",
                             "Data-parallel fine-tuning (MultiWorkerMirroredStrategy between workers, all GPUs of a "
                             "worker) with checkpoints every epoch; a rerun with the same --out resumes exactly."))


def _calibration(a) -> str:
    """``--calibrate``, from the command line or else the --config file (not a config field)."""
    value = getattr(a, "calibrate", None) or load_yaml_overrides(getattr(a, "config", None)).get("calibrate", "none")
    if value not in CALIBRATIONS:
        raise ConfigError("calibrate", f"{_source(a)}: calibrate must be {' or '.join(CALIBRATIONS)}. "
                                       f"Received: calibrate={value!r}")
    return value


def cmd_train(a) -> int:
    calibrate = _calibration(a)
    res = train(getattr(a, "cfg", None) or train_config_from_args(a))
    m = res.metrics
    print(f"train: best epoch {m['best_epoch']}/{m['epochs']}: val_auc {m['val_auc']:.3f}, "
          f"val_auc_abnormal {m['val_auc_abnormal']:.3f}, sensitivity {m['sensitivity']:.2f}, "
          f"specificity {m['specificity']:.2f}, {m['images_per_s']:.1f} images/s; classes {m['classes']}")
    print(f"  run: {res.out} (metrics.json, history.csv, training_curves.png, roc.png, model/)")
    if calibrate == "temperature":
        calibrate_after_training(str(res.out))
    return 0


def add_tune(sub) -> None:
    p = command(sub, "tune", "Ray Tune sweep over head width x classes x unfreeze depth (x lr)",
                "Searches head width x number of classes (or findings) x unfreeze depth (x learning rate) with Ray "
                "Tune; trials share the frozen base's features, ASHA stops weak ones early, and the best trial's "
                "model is written with the results table.")
    _add_train_flags(p, sweep=True)
    S = argparse.SUPPRESS
    p.add_argument("--num-samples", type=int, default=S, help="grid: repeats of the grid; random/optuna: trials"
                   + default_help(SweepConfig, "num_samples"))
    p.add_argument("--scheduler", choices=SCHEDULERS, default=S, help="asha stops weak trials early"
                   + default_help(SweepConfig, "scheduler"))
    p.add_argument("--search", choices=SEARCHES, default=S, help="how trials are chosen"
                   + default_help(SweepConfig, "search"))
    p.add_argument("--max-concurrent", type=int, default=S, help="trials at once (default: what the cluster's "
                                                                 "resources allow)")
    p.add_argument("--grace-period", type=int, default=S, help="ASHA: epochs every trial runs before it may be "
                                                               "stopped" + default_help(SweepConfig, "grace_period"))
    p.add_argument("--workers-per-trial", type=int, default=S, help="Ray Train workers per trial"
                   + default_help(TrainConfig, "num_workers"))
    p.add_argument("--trial-runner", choices=TRIAL_RUNNERS, default=S,
                   help="auto: one-worker trials train inside their Tune process, which Tune reuses; "
                        "train: every trial is a Ray Train run (always so with several workers per trial)"
                   + default_help(SweepConfig, "trial_runner"))
    p.add_argument("--combos", default=S, help="explicit W:K:D triples instead of the full grid, e.g. 0:2:0,64:4:1 "
                                               "(default: the full grid)")
    p.add_argument("--resume-errored", action="store_true", default=S,
                   help="when resuming a sweep, run its failed trials again"
                   + default_help(SweepConfig, "resume_errored"))
    p.add_argument("--no-shared-features", action="store_true", default=S,
                   help="recompute the frozen base in every trial, for comparison (default: off)")


def _values(v, cast, key: str, source: str) -> tuple:
    """A list flag (``0,64,256``, or a YAML list) as a tuple of ``cast``; an error names the key."""
    items = v if isinstance(v, (list, tuple)) else [x for x in str(v).split(",") if x.strip()]
    try:
        out = tuple(coerce_scalar(cast, x) for x in items)  # no bools, no 2.5 cut to 2; ranges: SweepConfig
    except (TypeError, ValueError):
        raise ConfigError(key, f"{source}: {key}: expected a comma-separated list of {cast.__name__}, "
                               f"got {v!r}") from None
    if not out:
        raise ConfigError(key, f"{source}: {key}: expected at least one value, got {v!r}")
    return out


def sweep_config_from_args(a) -> SweepConfig:
    """``tune``'s config: the --config file's values, the flags given on top, SweepConfig's defaults."""
    raw = load_yaml_overrides(a.config)
    _check_config_keys(raw, "tune", a.config)
    raw.update({k: v for k, v in vars(a).items() if k not in CLI_ONLY})
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
    calibrate = _calibration(a)
    cfg = getattr(a, "cfg", None) or sweep_config_from_args(a)
    s = sweep(cfg)
    print(f"tune: {s['trials']} trials ({s['completed']} completed, {s['stopped_early']} stopped early, "
          f"{s['failed']} failed) in {s['seconds']:.0f} s")
    print(format_sweep_table(storage.join(storage.absolute(cfg.out), "results.csv")))
    if "best" in s:
        b = s["best"]
        print(f"  best: {b['config']} val_auc_abnormal {b['metrics']['val_auc_abnormal']:.3f} -> model {b['model']}")
        if calibrate == "temperature":
            calibrate_after_training(storage.absolute(cfg.out))
    if not s["completed"]:
        print("xray-dist tune: error: no trial completed, so there is no best model (see results.csv's error "
              "column)", file=sys.stderr)
        return 1
    return 0


def format_sweep_table(results_csv: str, top: int = 10) -> str:
    """The sweep's trials as a small table, best first (the whole table is results.csv)."""
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
