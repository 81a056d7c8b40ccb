"""Sweeps: Ray Tune over head width × number of classes × unfreeze depth (× learning rate).

Train V2 pattern: each trial is a function trainable (:func:`trial_fn`) that builds its
:class:`~xray_dist.config.TrainConfig` with ``dataclasses.replace`` and runs the training loop of
``xray-dist train`` (:func:`xray_dist.training.worker.train_loop`), reporting every epoch to Tune so ASHA
can stop weak trials early. Trials with several workers launch the very same Ray Train trainer
(:func:`xray_dist.training.driver.make_trainer`) with ``TuneReportCallback``; one-worker trials (the usual
sweep) run the loop inside their own Tune process (:mod:`xray_dist.training.inprocess`), which Tune reuses
from trial to trial (``--trial-runner``).

Trials with unfreeze depth D < 5 train on shared frozen features (:mod:`xray_dist.training.features`),
computed once per (cache, weights, D) before the trials start. What the sweep writes at the end
is :mod:`xray_dist.training.sweep_results`'s.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import json
import logging
import math
import time
from pathlib import Path

from xray_dist.config import SweepConfig, TrainConfig
from xray_dist.data import fingerprint
from xray_dist.errors import RunStopped
from xray_dist.infra import compat, console, storage
from xray_dist.infra.worker_output import worker_logging
from xray_dist.infra.locks import TargetLock
from xray_dist.infra.runtime import init_ray
from xray_dist.model.artifacts import MODEL_DIR
from xray_dist.results import tracking
from xray_dist.results.runs import METRICS
from xray_dist.training.driver import make_trainer
from xray_dist.training.export import export_run
from xray_dist.training.features import ensure_features
from xray_dist.training.inprocess import can_run_in_process, train_in_process
from xray_dist.training.pipeline import DATA_CPUS
from xray_dist.training.resume import changed_settings, check_same_settings
from xray_dist.training.scalars import TENSORBOARD_DIR
from xray_dist.training.sweep_results import collect_results, settings_text, trial_name, write_outputs

log = logging.getLogger(__name__)

SWEEP_NAME = "sweep"
TRIAL_CPUS = 0.1  # the trial function only waits for its Trainer; the workers hold the real resources


def trial_config(base: TrainConfig, params: dict, out: str, features: dict) -> TrainConfig:
    cfg = dataclasses.replace(base, head_width=int(params["head_width"]), num_classes=int(params["num_classes"]),
                              unfreeze_blocks=int(params["unfreeze_blocks"]), lr=float(params["lr"]), out=out)
    return dataclasses.replace(cfg, features=features.get(str(cfg.unfreeze_blocks)))


@dataclasses.dataclass(frozen=True)
class TrialSetup:
    """What every trial shares (given through ``tune.with_parameters``, so Tune's table and the
    results' configs show only the searched parameters)."""

    base: TrainConfig
    sweep_out: str
    features: dict  # unfreeze depth (str) -> frozen-feature directory
    in_process: bool


def trial_fn(params: dict, setup: TrialSetup) -> None:
    """One trial: the training loop of ``xray-dist train``, in this process or as a Ray Train run."""
    import ray.tune  # Ray: heavy (a trial runs in a Tune process)
    from ray.tune.integration.ray_train import TuneReportCallback

    worker_logging(terminal=False)

    t0 = time.time()
    ctx = ray.tune.get_context()
    out = storage.join(setup.sweep_out, "trials", Path(ctx.get_trial_dir()).name)
    cfg = trial_config(setup.base, params, out, setup.features)
    try:
        done = storage.read_json(storage.join(out, METRICS))
    except FileNotFoundError:
        done = {}
    if done.get("complete"):
        # Tune reruns a trial whose end it had not recorded when the sweep was interrupted: the
        # trial already finished, so report its final epoch again instead of training.
        # (metrics.json holds a NaN metric as null: reported as NaN again, as the trial first did)
        ray.tune.report({k: float("nan") if v is None else v for k, v in done["final"].items()
                         if v is None or isinstance(v, (int, float))})
        return
    storage.makedirs(out)
    storage.write_json(storage.join(out, "config.json"), cfg.to_dict(), indent=2)
    if setup.in_process:
        # one worker: the same training loop in this (reused) trial process, reporting straight to Tune
        try:
            result, scheme, spec = train_in_process(cfg, on_report=ray.tune.report, should_stop=compat.trial_stop_requested)
        except RunStopped:
            return  # the scheduler stopped this trial: no export, the row says stopped_early
        t_trainer = t0
    else:
        trainer, scheme, spec = make_trainer(cfg, callbacks=[TuneReportCallback()], storage_path=storage.join(out, "ray"),
                                             terminal=False)
        t_trainer = time.time()
        result = trainer.fit()
    if result.error:  # an in-process run that reported no checkpoint (Ray Train's fit() raises itself)
        raise result.error
    t_fit = time.time()
    with storage.staged_output(out, replace=(MODEL_DIR, TENSORBOARD_DIR), marker=METRICS) as local_out:
        export_run(cfg, result, scheme, spec, local_out, full_model=False)  # the sweep writes its best trial's full model
        # where the trial's time went (start-up vs training vs export), for tuning sweeps
        storage.write_json(local_out / "timings.json", {"trial_start": t0, "trainer_built": t_trainer,
                                                        "fit_done": t_fit, "exported": time.time()}, indent=2)


def in_process(sweep: SweepConfig) -> bool:
    """Whether trials train inside their own Tune process (:mod:`xray_dist.training.inprocess`)."""
    if sweep.trial_runner == "inprocess" and not can_run_in_process(sweep.base):
        raise ValueError("--trial-runner inprocess needs one worker per trial and no cpu_replicas; use "
                         "--trial-runner train for multi-worker trials")
    return sweep.trial_runner == "inprocess" or (sweep.trial_runner == "auto" and can_run_in_process(sweep.base))


def trial_resources(sweep: SweepConfig) -> dict:
    """What one trial's Tune process asks for: the worker's share when it trains itself, else a sliver
    (it only waits for its Ray Train workers, which hold the real resources)."""
    b = sweep.base
    if not in_process(sweep):
        return {"cpu": TRIAL_CPUS}
    return {"cpu": b.worker_cpus, **({"gpu": b.gpus_per_worker} if b.gpus_per_worker else {})}


def concurrency_choice(sweep: SweepConfig, resources: dict, trials: int | None = None,
                       max_resources: dict | None = None) -> tuple[int, str]:
    """``(trials at a time, why)`` when ``--max-concurrent`` is not given.

    ``resources`` are the cluster's now; ``max_resources`` what its autoscaler may grow it to
    (Ray's view of the cluster config, as Ray Train uses it; None on a fixed cluster). On an
    autoscaling cluster the nodes up at the moment say nothing — a head started with 0 CPUs and
    no worker up would mean "one trial at a time" — so the autoscaler's maximum decides, capped by
    the number of ``trials``.
    """
    b = sweep.base
    if b.gpus_per_worker:
        need, unit = b.num_workers * b.gpus_per_worker, "GPU"
    else:
        trial_process = 0 if in_process(sweep) else TRIAL_CPUS
        need = b.num_workers * b.worker_cpus + trial_process + DATA_CPUS  # + room for one Ray Data task
        unit = "CPU"
    have = float(resources.get(unit, 0))
    fit = int(have // need)
    most = float((max_resources or {}).get(unit, 0) or 0)
    if most > have and int(most // need) > fit:
        grown = int(most // need)
        if trials:
            grown = min(grown, trials)
        return grown, (f"the autoscaler can grow the cluster to {most:g} {unit} (now {have:g}) / {need:g} per trial; "
                       "cap with --max-concurrent")
    if fit >= 1:
        return fit, f"{have:g} {unit} in the cluster / {need:g} per trial"
    return 1, f"the cluster has {have:g} {unit}, less than one trial's {need:g}, and cannot grow: one at a time"


def param_space(sweep: SweepConfig) -> tuple[dict, int]:
    """Tune's param space and num_samples for the search mode."""
    from ray import tune  # Ray: heavy

    lr = tune.loguniform(*sweep.lr) if sweep.lr[0] < sweep.lr[1] else sweep.lr[0]
    if sweep.search == "grid":
        grid = list(sweep.combos or itertools.product(sweep.head_widths, sweep.num_classes, sweep.unfreeze_blocks))
        space = {"combo": tune.grid_search([list(g) for g in grid]), "lr": lr}
        return space, sweep.num_samples
    return ({"head_width": tune.choice(list(sweep.head_widths)), "num_classes": tune.choice(list(sweep.num_classes)),
             "unfreeze_blocks": tune.choice(list(sweep.unfreeze_blocks)), "lr": lr}, sweep.num_samples)


def _grid_to_params(fn):
    def wrapped(params: dict, setup: TrialSetup) -> None:
        if "combo" in params:
            params = dict(params)
            params["head_width"], params["num_classes"], params["unfreeze_blocks"] = params.pop("combo")
        fn(params, setup)
    wrapped.__name__ = fn.__name__
    return wrapped


def _SweepProgress(metric: str, epochs: int, every: float = 30.0):  # noqa: N802 - built lazily (Ray Tune imported here)
    """A Tune callback for the terminal: one line per finished, stopped or failed trial, and a
    status line at most every ``every`` seconds while trials run."""
    from ray.tune import Callback

    class SweepProgress(Callback):
        def __init__(self):
            self.last = time.time()
            self.done = 0

        def _params(self, trial) -> str:
            return settings_text(trial.config)

        def _line(self, trial, what: str) -> None:
            r = trial.last_result or {}
            best = (getattr(trial, "metric_analysis", {}) or {}).get(metric, {}).get("max", r.get(metric))
            score = f"best {metric} {best:.3f}" if isinstance(best, (int, float)) and not math.isnan(best) else ""
            console.say(f"tune: trial {trial_name(trial)} ({self._params(trial)}) {what} after {r.get('epoch', 0)} "
                        "epochs" + (f", {score}" if score else ""))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            stopped = (trial.last_result or {}).get("epoch", 0) < epochs
            self._line(trial, "stopped early" if stopped else "done")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            self._line(trial, "FAILED (see results.csv)")

        def on_step_begin(self, iteration, trials, **info):
            now = time.time()
            if now - self.last < every or not trials:
                return
            self.last = now
            running = [t for t in trials if t.status == "RUNNING"]
            scores = [t.last_result.get(metric) for t in trials if t.last_result and
                      isinstance(t.last_result.get(metric), (int, float))]
            best = f", best {metric} so far {max(scores):.3f}" if scores else ""
            console.say(f"tune: {self.done}/{len(trials)} trials finished, {len(running)} running{best}")

    return SweepProgress()


def _FinishingASHA(**kwargs):  # noqa: N802 - built lazily: Ray Tune is imported inside functions here
    """ASHA that never stops a trial at its last epoch.

    Ray's ASHA places a rung at ``max_t`` itself whenever ``max_t / grace_period`` is a power of
    the reduction factor (grace 3, max 6: rungs at 3 and 6), and ``stop_last_trials=False`` does
    not exempt it: a trial could be stopped at the report of its final epoch, before it exports its
    model. Such a trial has already paid for every epoch, so it finishes.
    """
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    time_attr, max_t = kwargs["time_attr"], kwargs["max_t"]  # the factory's own arguments (not ASHA's private copies)

    class FinishingASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            if result.get(time_attr, 0) >= max_t:
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

    return FinishingASHA(**kwargs)


def _recorded_trials(tune_path: str):
    """A callable giving trial id → status in the sweep's newest ``experiment_state-*.json``: the
    file Tune restores its trials from (the newest name, in the sweep's own storage, not a local
    copy a killed driver may have left newer)."""
    def recorded() -> dict[str, str] | None:
        names = [e.rel for e in storage.list_files(tune_path)
                 if "/" not in e.rel and fnmatch.fnmatch(e.rel, "experiment_state-*.json")]
        if not names:
            return None
        state = json.loads(storage.read_text(storage.join(tune_path, max(names))))
        return {(t := json.loads(trial))["trial_id"]: t["status"] for trial, _ in state["trial_data"]}
    return recorded


def sweep(cfg: SweepConfig) -> dict:
    """Run (or resume) the sweep; write results.csv, best.json and the metric-vs-dimension PNG."""
    cfg = dataclasses.replace(cfg, base=cfg.base.resolved(), out=storage.absolute(cfg.out))
    for where in (cfg.out, cfg.base.cache,
                  *([cfg.base.weights] if cfg.base.weights not in ("imagenet", "none") else [])):
        storage.check_location(where)
    with TargetLock(cfg.out, "xray-dist tune"):  # one sweep per directory at a time
        return _sweep_locked(cfg)


def _sweep_locked(cfg: SweepConfig) -> dict:
    import ray  # Ray: heavy

    out = cfg.out
    fp = fingerprint.check_unchanged(out, cfg.base.cache, "sweep")  # a resumed sweep on a re-split cache: refused
    _check_same_sweep(cfg, out)
    storage.makedirs(out)
    fingerprint.record(out, cfg.base.cache, fp)
    storage.write_json(storage.join(out, SWEEP_CONFIG), _comparable(cfg), indent=2, default=str)
    init_ray(cfg.base.address)
    t0 = time.time()
    features = _shared_features(cfg)
    t_features = time.time() - t0
    if cfg.shared_features and features:
        log.debug("shared frozen features (no input augmentation, so they are exact) for depths %s: %.1f s",
                  sorted(features), t_features)
    elif not cfg.shared_features:
        log.info("shared frozen features off: every trial recomputes the frozen base")
    local = in_process(cfg)
    setup = TrialSetup(base=cfg.base, sweep_out=out, features=features, in_process=local)
    if cfg.max_concurrent:
        max_conc, why = cfg.max_concurrent, "--max-concurrent"
    else:
        max_conc, why = concurrency_choice(cfg, ray.cluster_resources(), planned_trials(cfg),
                                           compat.autoscaler_max_resources())
    tuner = _tuner(cfg, setup, max_conc)
    log.info("tune: up to %d trials at a time (%s), %s", max_conc, why,
             "each training in its own Tune process" if local else "each a Ray Train run")
    with console.output_to_log():  # Tune's own prints (experiment box, paths): the log; ours: the terminal
        grid = tuner.fit()
    rows = collect_results(grid, cfg, out)
    return write_outputs(rows, cfg, out, time.time() - t0, t_features)


def _shared_features(cfg: SweepConfig) -> dict[str, str]:
    """Unfreeze depth (str) → frozen-feature directory, computed now where missing (none when
    ``shared_features`` is off): only the depths some trial will train at."""
    features: dict[str, str] = {}
    if cfg.shared_features and cfg.base.augment != "none":
        log.info("tune: --augment %s: frozen blocks see augmented images, so the shared frozen features are off "
                 "and every trial trains on images", cfg.base.augment)
    elif cfg.shared_features:
        depths = {c[2] for c in cfg.combos} if cfg.combos else set(cfg.unfreeze_blocks)  # combos: grid only
        for d in sorted(depths):
            path = ensure_features(cfg.base.cache, cfg.base.weights, cfg.base.seed, d, precision=cfg.base.precision)
            if path is not None:
                features[str(d)] = path
    return features


def _tune_config(cfg: SweepConfig, max_conc: int, num_samples: int, reuse: bool):
    """Tune's config for a new sweep: the objective, the scheduler (ASHA that lets a trial finish
    its last epoch, or FIFO) and the search (grid and random: Tune's own; Optuna)."""
    from ray import tune  # Ray: heavy
    from ray.tune.schedulers import FIFOScheduler

    scheduler = (_FinishingASHA(time_attr="epoch", max_t=cfg.base.epochs, grace_period=cfg.grace_period,
                                reduction_factor=2, stop_last_trials=False)
                 if cfg.scheduler == "asha" else FIFOScheduler())
    if cfg.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ValueError(f"--search optuna needs the optuna package (pip install optuna): {e}") from None
        search_alg = OptunaSearch()
    else:  # Tune's own grid and random search, with a restore that agrees with Tune's trials
        search_alg, max_conc = _grid(cfg, max_conc), None
    return tune.TuneConfig(metric=cfg.base.metric, mode="max", num_samples=num_samples, scheduler=scheduler,
                           search_alg=search_alg, max_concurrent_trials=max_conc, reuse_actors=reuse,
                           # W0-K2-D1-lr1e-3_00000: in results.csv, the report and on disk
                           trial_name_creator=trial_name, trial_dirname_creator=trial_name)


def _grid(cfg: SweepConfig, max_conc: int):
    """Grid and random search: Tune's generator, whose restore agrees with Tune's restored trials."""
    return compat.resumable_grid(max_conc, _recorded_trials(storage.join(cfg.out, SWEEP_NAME)), cfg.resume_errored)


def _tuner(cfg: SweepConfig, setup: TrialSetup, max_conc: int):
    """The Tuner of this sweep: restored from ``SWEEP/sweep`` when an earlier run left one, else new."""
    from ray import tune  # Ray: heavy

    space, num_samples = param_space(cfg)
    local = setup.in_process
    tune_config = _tune_config(cfg, max_conc, num_samples, reuse=local)
    compat.stop_tune_forwarding_credentials()  # else Ray's runtime-env agent logs the driver's AWS secret on every node
    trainable = tune.with_resources(tune.with_parameters(_grid_to_params(trial_fn), setup=setup),
                                    trial_resources(cfg))
    path = storage.join(cfg.out, SWEEP_NAME)
    tune_path, tune_fs = storage.ray_storage(path)
    root_path, root_fs = storage.ray_storage(cfg.out)
    if tune.Tuner.can_restore(tune_path, storage_filesystem=tune_fs):
        log.info("resuming the sweep in %s", path)
        tuner = tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=cfg.resume_errored,
                                   param_space=space, storage_filesystem=tune_fs)
        if cfg.search != "optuna":  # this run's generator and --max-concurrent, whatever the sweep began with
            compat.replace_restored_search(tuner, _grid(cfg, max_conc))
        return tuner
    return tune.Tuner(
        trainable, param_space=space, tune_config=tune_config,
        run_config=tune.RunConfig(name=SWEEP_NAME, storage_path=root_path, storage_filesystem=root_fs,
                                  # Tune's own console output (a result box per trial) with -v only;
                                  # otherwise a line per finished trial and a periodic status line
                                  verbose=1 if console.verbosity() >= console.VERBOSE else 0,
                                  callbacks=[c for c in (_SweepProgress(cfg.base.metric, cfg.base.epochs),
                                                         tracking.sweep_callback(cfg.base.mlflow, cfg.out)) if c],
                                  # in-process trials are retried here; a Ray Train trial retries its
                                  # own workers with the same --max-failures, so not twice
                                  failure_config=tune.FailureConfig(
                                      max_failures=cfg.base.max_failures if local else 0, fail_fast=False)),
    )


SWEEP_CONFIG = "sweep_config.json"
#: Settings a resumed sweep may change: how many trials run at once and how, and where Ray is.
_MAY_CHANGE = {"max_concurrent", "trial_runner", "resume_errored", "address", "max_failures", "mlflow"}


#: Base settings every trial replaces with its own searched values: not part of what a sweep is.
#: (``runner`` is train's own: a sweep's trials run as ``trial_runner`` says.)
_SEARCHED = {"head_width", "num_classes", "unfreeze_blocks", "lr", "runner"}


def _comparable(cfg: SweepConfig) -> dict:
    d = dataclasses.asdict(cfg)
    base = {k: v for k, v in d.pop("base").items() if k not in _MAY_CHANGE | _SEARCHED}
    return json.loads(storage.dumps_json({**{k: v for k, v in d.items() if k not in _MAY_CHANGE}, "base": base},
                                         default=str))


def _check_same_sweep(cfg: SweepConfig, out: str) -> None:
    """A sweep resumed with another search space or other base settings would mix two
    configurations in one results table: refused, with every difference."""
    new = _comparable(cfg)

    def differences(old: dict) -> list[str]:
        top = sorted((set(old) | set(new)) - {"base"})
        return changed_settings(old, new, top) + changed_settings(old.get("base", {}), new["base"])

    check_same_settings(out, SWEEP_CONFIG, "sweep", differences)


def planned_trials(cfg: SweepConfig) -> int:
    if cfg.search != "grid":
        return cfg.num_samples
    grid = len(cfg.combos) if cfg.combos else len(cfg.head_widths) * len(cfg.num_classes) * len(cfg.unfreeze_blocks)
    return grid * cfg.num_samples
