"""bfloat16 vs float32 on this CPU: what ``--precision bfloat16`` buys, and what it costs in answers.

Called by bench/run.py (``--only precision``); :func:`bench_precision` returns one dict:

- ``matmul_gflops_float32`` / ``_bfloat16``: this machine's matrix-product peak in each format, the
  best of ``tf.matmul`` n×n at three sizes and of two 3×3 convolutions at VGG16's busiest shapes
  (matrix products to oneDNN), the two formats timed in alternating windows so that the load of a
  shared machine falls on both alike;
- ``extract_images_per_s_float32`` / ``_bfloat16``: the frozen VGG16 base
  (:func:`xray_dist.model.network.frozen_part`, depth 0, what a sweep's feature extraction runs) built
  under :func:`xray_dist.model.precision.keras_policy`, one batch at a time, alternating; their
  ratio ``extract_bf16_ratio`` and each as a fraction of that format's matmul peak (the conv base's
  FLOPs per image from its layer shapes);
- ``predict_bf16_ratio``: ``predict_files(engine="local")`` images/s over the bench's uncompressed
  files (decode included) with a model at the bench's size, bfloat16 ÷ float32, the best of three
  runs each; one plain decode pass of the same files says how much of it no precision can change;
- agreement: a model trained (float32, a few epochs) on the same files at a small size, then
  ``predict_files`` in both formats: the largest probability difference over images and classes and
  the difference in AUROC of the abnormal score against the labels, with the stated bound;
- sweep ranking: the same small sweep (head widths × unfreeze depths, fixed lr, FIFO) with base
  precision float32 and bfloat16 (features extracted, and trials trained, in that format): the
  trials ranked by ``val_auc_abnormal`` in each, and whether the order is the same (ties, common on
  these easy synthetic images, are broken by (head width, depth) alike on both sides and also
  reported as groups).

The load average at the start and end of the part is recorded: on a shared machine (``contended``)
the absolute figures drop, while the alternating timings keep the ratios comparable.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: The agreement bound: bfloat16 inference must give the float32 answer within these.
AGREEMENT_BOUND = {"max_abs_prob_diff": 0.02, "auroc_diff": 0.02}

PRECISIONS = ("float32", "bfloat16")

#: VGG16's conv blocks: (filters, convolutions), each block ending in a 2×2 max-pool.
_VGG_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def vgg16_conv_gflop(image_size: int) -> float:
    """FLOPs (multiply and add counted apart) of VGG16's conv layers for one image, in GFLOP:
    the sum over conv layers of 2·H·W·k²·Cin·Cout (3×3, same padding; 30.7 at 224 px)."""
    flops, hw, cin = 0, image_size, 3
    for cout, convs in _VGG_BLOCKS:
        for _ in range(convs):
            flops += 2 * hw * hw * 9 * cin * cout
            cin = cout
        hw //= 2
    return flops / 1e9


def _alternate(calls: dict, seconds: float, window: float) -> dict:
    """Run each of ``calls`` (name → zero-argument function returning a work count) in turn, in
    windows of about ``window`` s (0: one call), until each has run ``seconds`` in all (a name that
    has stops, the others go on). Per name: total work,
    total seconds and the best window's rate (work/s)."""
    out = {k: {"work": 0.0, "seconds": 0.0, "best": 0.0, "windows": 0} for k in calls}
    while min(v["seconds"] for v in out.values()) < seconds:
        for k, fn in calls.items():
            if out[k]["seconds"] >= seconds:  # done: the others go on alone
                continue
            work, t0 = 0.0, time.perf_counter()
            while True:
                work += fn()
                dt = time.perf_counter() - t0
                if dt >= window:
                    break
            o = out[k]
            o["work"] += work
            o["seconds"] += dt
            o["windows"] += 1
            o["best"] = max(o["best"], work / dt)
    return out


#: The peak probes besides ``tf.matmul`` n×n: 3×3 convolutions of a batch (16 at n = 2048) at VGG16's two
#: busiest shapes (height = width, channels in = out), which oneDNN runs as implicit matrix products
#: (on AMX in bfloat16) and which reach more than any plain n×n ``tf.matmul`` on this CPU.
_CONV_PROBES = ((56, 256), (28, 512))


def matmul_peaks(n: int = 2048, seconds: float = 2.5) -> dict:
    """This machine's matrix-product peak in float32 and in bfloat16 (GFLOP/s): the best of
    ``tf.matmul`` at n/2, n and 2n and of the 3×3 convolutions in :data:`_CONV_PROBES` (FLOPs
    2·m·k·n a product, multiply and add counted apart), each timed ``seconds`` in windows
    alternating between the two formats. ``gflops_<format>`` is the best probe's rate; every
    probe's rate is kept (``probes``)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)

    def tensor(shape, p):
        return tf.cast(tf.constant(rng.standard_normal(shape, dtype=np.float32)), p)

    calls, names, batch = {}, [], max(1, min(16, n // 128))
    for p in PRECISIONS:
        probes = {}
        for m in (n // 2, n, 2 * n):
            a, b = tensor((m, m), p), tensor((m, m), p)
            probes[f"matmul_{m}"] = (tf.function(lambda a=a, b=b: tf.matmul(a, b)), 2.0 * m ** 3)
        for hw, c in _CONV_PROBES:
            x, w = tensor((batch, hw, hw, c), p), tensor((3, 3, c, c), p)
            probes[f"conv3x3_{hw}px_{c}ch"] = (tf.function(lambda x=x, w=w: tf.nn.conv2d(x, w, 1, "SAME")),
                                               2.0 * batch * hw * hw * 9 * c * c)
        for name, (fn, flops) in probes.items():
            for _ in range(2):  # trace, and let oneDNN pick and cache its kernel
                fn().numpy()
            calls[(name, p)] = (lambda fn=fn, flops=flops: (fn(), flops)[1])  # on the CPU: returns when done
        names = list(probes)
    r = _alternate(calls, seconds, min(0.5, seconds / 4))
    res = {"n": n, "seconds_each": seconds, "probes": {}}
    for p in PRECISIONS:
        rates = {name: r[(name, p)]["work"] / r[(name, p)]["seconds"] / 1e9 for name in names}
        res["probes"][p] = rates
        best = max(rates, key=rates.get)
        res[f"gflops_{p}"], res[f"peak_probe_{p}"] = rates[best], best
        res[f"best_window_gflops_{p}"] = max(r[(name, p)]["best"] for name in names) / 1e9
    res["bf16_ratio"] = res["gflops_bfloat16"] / res["gflops_float32"]
    return res


def bench_extract(image_size: int, batch: int, seconds: float, peaks: dict) -> dict:
    """Images/s of the frozen VGG16 base (depth 0, random weights) built in each precision, through
    the forward pass extraction uses (:func:`xray_dist.model.network.scorer`), one batch of uint8
    images per call, the two alternating batch by batch."""
    import tf_keras as keras

    from xray_dist.model.network import frozen_part, scorer
    from xray_dist.model.precision import keras_policy

    x = np.random.default_rng(0).integers(0, 255, (batch, image_size, image_size), dtype=np.uint8)
    fns, outs = {}, {}
    for p in PRECISIONS:
        keras.utils.set_random_seed(0)
        with keras_policy(p) as chosen:
            model = frozen_part(image_size, "none", 0)
        fn = scorer(model)
        for _ in range(2):  # trace, warm up
            outs[p] = fn(x).astype(np.float32)
        fns[p] = (fn, chosen.policy, model)  # the scorer holds its model weakly

    def call(p):
        def one():
            fns[p][0](x)
            return float(batch)
        return one

    r = _alternate({p: call(p) for p in PRECISIONS}, seconds, 0.0)  # window 0: one batch each, alternating
    gflop = vgg16_conv_gflop(image_size)
    res = {"image_size": image_size, "batch": batch, "seconds_each": seconds, "gflop_per_image": gflop,
           "policies": {p: fns[p][1] for p in PRECISIONS},
           "features_rel_diff": float(np.abs(outs["bfloat16"] - outs["float32"]).max()
                                      / max(float(np.abs(outs["float32"]).max()), 1e-12))}
    for p in PRECISIONS:
        rate = r[p]["work"] / r[p]["seconds"]
        res[f"images_per_s_{p}"] = rate
        res[f"best_batch_images_per_s_{p}"] = r[p]["best"]
        res[f"batches_{p}"] = r[p]["windows"]
        res[f"fraction_of_peak_{p}"] = rate * gflop / peaks[f"gflops_{p}"]
    res["bf16_ratio"] = res["images_per_s_bfloat16"] / res["images_per_s_float32"]
    return res


def bench_predict(files: list[str], run: Path, work: Path) -> dict:
    """``predict_files(engine="local")`` images/s in each precision: three runs each, alternating
    (float32, bfloat16, float32, ...); the best run of each counts (a 2-core VM's runs vary by 30 %)."""
    from xray_dist.data.dicom import load_image
    from xray_dist.inference.predict import predict_files
    from xray_dist.model.artifacts import run_preprocess

    res: dict = {"files": len(files), "seconds": {p: [] for p in PRECISIONS}}
    for i in range(3):
        for p in PRECISIONS:
            t0 = time.perf_counter()
            rows = predict_files(str(run), files, str(work / f"prec_predict_{p}_{i}.csv"), engine="local",
                                 precision=p)
            res["seconds"][p].append(time.perf_counter() - t0)
            assert len(rows) == len(files) and not any(r["error"] for r in rows), rows[:2]
    for p in PRECISIONS:
        res[f"images_per_s_{p}"] = len(files) / min(res["seconds"][p])
    res["bf16_ratio"] = res["images_per_s_bfloat16"] / res["images_per_s_float32"]
    # the part no precision changes: reading and resizing every file, as predict does (one pass)
    pre = run_preprocess(run)
    t0 = time.perf_counter()
    for f in files:
        load_image(f, pre)
    res["decode_seconds"] = time.perf_counter() - t0
    # what is left once one single-thread decode pass is taken away: not the model's own time,
    # since predict decodes on every core while the model loads and runs
    for p in PRECISIONS:
        res[f"model_seconds_{p}"] = max(min(res["seconds"][p]) - res["decode_seconds"], 0.0)
    res["ratio_ceiling_decode_bound"] = min(res["seconds"]["float32"]) / res["decode_seconds"]
    res["limit"] = ("VGG16 forward (what bfloat16 speeds up) + pydicom decode and resize of every file (the same in "
                    "both: ratio_ceiling_decode_bound is the ratio if the model took no time at all); decoding "
                    "overlaps the model, so model_seconds_* (predict minus a single-thread decode pass) are not "
                    "the model's own time")
    return res


def _auroc(truth: np.ndarray, score: np.ndarray) -> float:
    from xray_dist.results.metrics import auroc

    return auroc(truth, score)


def bench_agreement(unc_dir: Path, work: Path, ps: dict) -> tuple[dict, Path]:
    """Train a short float32 run on the bench's files at ``ps["agree_px"]``, then predict the same
    files in float32 and bfloat16: how far apart the answers are. Returns the result and the cache."""
    from xray_dist.config import PrepareConfig, PreprocessSpec, TrainConfig
    from xray_dist.data.prepare import prepare
    from xray_dist.inference.predict import predict_files
    from xray_dist.training.driver import train

    px = ps["agree_px"]
    cache = work / f"cache_prec_{px}"
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    prepare(PrepareConfig(data_dir=str(unc_dir), labels=str(unc_dir / "labels.csv"), out=str(cache),
                          preprocess=PreprocessSpec(image_size=px), val_fraction=0.25))
    prepare_s = time.perf_counter() - t0
    run = work / "prec_trained"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    train(TrainConfig(cache=str(cache), out=str(run), epochs=ps["train_epochs"], batch_size=8, lr=ps["train_lr"],
                      weights="none", unfreeze_blocks=ps["train_unfreeze"], num_workers=1, seed=0,
                      precision="float32"))
    train_s = time.perf_counter() - t0
    with open(unc_dir / "labels.csv", newline="") as f:
        labelled = [(str(unc_dir / r["path"]), r["label"]) for r in csv.DictReader(f)]
    files = [f for f, _ in labelled]
    truth = np.array([lab != "normal" for _, lab in labelled], dtype=int)
    probs, scores = {}, {}
    for p in PRECISIONS:
        rows = predict_files(str(run), files, str(work / f"prec_agree_{p}.csv"), engine="local", precision=p)
        assert not any(r["error"] for r in rows), rows[:2]
        cols = [k for k in rows[0] if k.startswith("p_")]
        probs[p] = np.array([[float(r[k]) for k in cols] for r in rows])
        scores[p] = np.array([float(r["abnormal_score"]) for r in rows])
    diff = np.abs(probs["bfloat16"] - probs["float32"])
    auc = {p: _auroc(truth, scores[p]) for p in PRECISIONS}
    trained = {}
    try:
        m = json.loads((run / "metrics.json").read_text())
        trained = {k: m[k] for k in ("val_auc_abnormal", "epochs", "best_epoch") if k in m}
    except (OSError, ValueError):
        pass
    res = {"image_size": px, "files": len(files), "classes": cols, "train_epochs": ps["train_epochs"],
           "train_unfreeze_blocks": ps["train_unfreeze"], "train_lr": ps["train_lr"], "trained_metrics": trained,
           "prepare_seconds": prepare_s, "train_seconds": train_s,
           "max_abs_prob_diff": float(diff.max()), "mean_abs_prob_diff": float(diff.mean()),
           "auroc_float32": auc["float32"], "auroc_bfloat16": auc["bfloat16"],
           "auroc_diff": float(abs(auc["float32"] - auc["bfloat16"])),
           "prob_range_float32": [float(probs["float32"].min()), float(probs["float32"].max())],
           "same_prediction_fraction": float(np.mean(probs["float32"].argmax(1) == probs["bfloat16"].argmax(1))),
           "bound": AGREEMENT_BOUND,
           "note": "AUROC over every file (training and validation images alike): it compares the two formats, "
                   "it does not estimate the model's accuracy"}
    res["within_bound"] = bool(res["max_abs_prob_diff"] <= AGREEMENT_BOUND["max_abs_prob_diff"]
                               and res["auroc_diff"] <= AGREEMENT_BOUND["auroc_diff"])
    return res, cache


def _ranking(results_csv: Path) -> tuple[list, list]:
    """Trials of a sweep's results.csv ranked by val_auc_abnormal (best first; ties in (head
    width, depth) order): ``[(head_width, unfreeze_blocks), ...]`` and the rows behind it."""
    with open(results_csv, newline="") as f:
        rows = [{"head_width": int(r["head_width"]), "unfreeze_blocks": int(r["unfreeze_blocks"]),
                 "val_auc_abnormal": float(r["val_auc_abnormal"] or "nan"), "status": r["status"]}
                for r in csv.DictReader(f)]
    def key(r):
        auc = r["val_auc_abnormal"]
        return (-(auc if auc == auc else -1.0), r["head_width"], r["unfreeze_blocks"])  # NaN (failed) last

    rows.sort(key=key)
    return [(r["head_width"], r["unfreeze_blocks"]) for r in rows], rows


def _tie_groups(rows: list) -> list:
    """The ranking as groups of trials with equal val_auc_abnormal (to 4 decimals), best first."""
    groups: list = []
    for r in rows:
        v = round(r["val_auc_abnormal"], 4)
        if groups and groups[-1][0] == v:
            groups[-1][1].append((r["head_width"], r["unfreeze_blocks"]))
        else:
            groups.append((v, [(r["head_width"], r["unfreeze_blocks"])]))
    return [sorted(g) for _, g in groups]


def _discordant(a: dict, b: dict) -> list:
    """Pairs of trials that ``a`` and ``b`` (name → val AUC) order strictly the opposite way."""
    names = sorted(a)
    return [[x, y] for i, x in enumerate(names) for y in names[i + 1:]
            if (a[x] - a[y]) * (b[x] - b[y]) < 0]


def bench_sweep_ranking(cache: Path, work: Path, ps: dict) -> dict:
    """The same small sweep with base precision float32 and bfloat16; the trial rankings."""
    from xray_dist.config import SweepConfig, TrainConfig
    from xray_dist.data.cache import load_manifest
    from xray_dist.training.tune import sweep

    combos = tuple((w, 2, d) for d in ps["sweep_depths"] for w in ps["sweep_widths"])
    res: dict = {"combos": [[w, d] for w, _, d in combos], "epochs": ps["sweep_epochs"], "lr": ps["sweep_lr"],
                 "image_size": ps["agree_px"],
                 "val_images": int((load_manifest(cache).to_pandas().split == "val").sum())}
    ranks, rows = {}, {}
    for p in PRECISIONS:
        out = work / f"prec_sweep_{p}"
        shutil.rmtree(out, ignore_errors=True)
        base = TrainConfig(cache=str(cache), out=str(out), epochs=ps["sweep_epochs"], batch_size=8,
                           lr=ps["sweep_lr"], weights="none", unfreeze_blocks=0, seed=0, precision=p)
        t0 = time.perf_counter()
        summary = sweep(SweepConfig(base=base, out=str(out), combos=combos, lr=(ps["sweep_lr"], ps["sweep_lr"]),
                                    scheduler="fifo"))
        res[f"seconds_{p}"] = time.perf_counter() - t0
        res[f"completed_{p}"] = summary.get("completed")
        ranks[p], rows[p] = _ranking(out / "results.csv")
        res[f"ranking_{p}"] = [list(t) for t in ranks[p]]
        res[f"val_auc_{p}"] = {f"w{r['head_width']}_d{r['unfreeze_blocks']}": r["val_auc_abnormal"]
                               for r in rows[p]}
        res[f"tie_groups_{p}"] = [[list(t) for t in g] for g in _tie_groups(rows[p])]
    res["ranking_same"] = ranks["float32"] == ranks["bfloat16"]
    res["tie_groups_same"] = _tie_groups(rows["float32"]) == _tie_groups(rows["bfloat16"])
    # a pair tied on one side and ordered on the other is not discordant: only strict reversals count
    res["discordant_pairs"] = _discordant(res["val_auc_float32"], res["val_auc_bfloat16"])
    res["best_same"] = ranks["float32"][:1] == ranks["bfloat16"][:1]
    res["max_abs_val_auc_diff"] = float(max(abs(res["val_auc_float32"][k] - res["val_auc_bfloat16"][k])
                                            for k in res["val_auc_float32"]))
    return res


def _cpu_name() -> str | None:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return None


def bench_precision(unc_dir: Path, work: Path, s: dict) -> dict:
    """Every figure above; ``s`` is a bench/run.py SETTINGS entry (its ``precision`` sizes this part)."""
    import ray

    from xray_dist.model.precision import cpu_bf16_flag

    ps = s["precision"]
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    res: dict = {"cpu": _cpu_name(), "cpus": os.cpu_count(), "cpu_bf16_flag": cpu_bf16_flag(),
                 "settings": ps, "seconds": {}}

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        res["seconds"][name] = time.perf_counter() - t0
        return out

    res["matmul"] = timed("matmul", matmul_peaks, ps["matmul_n"], ps["matmul_seconds"])
    res["extract"] = timed("extract", bench_extract, s["image_size"], s["batch"], ps["extract_seconds"], res["matmul"])
    from run import _bench_model  # bench/run.py's helper (bench/ is on sys.path when run.py runs)

    files = [str(f) for f in sorted((unc_dir / "images").glob("*.dcm"))]
    res["predict"] = timed("predict", bench_predict, files, _bench_model(work, s["image_size"]), work)
    if ray.is_initialized():  # prepare, train and the sweeps: one fresh Ray with every CPU
        ray.shutdown()
    from xray_dist.infra.runtime import init_ray

    init_ray(None, os.cpu_count() or 2)
    try:
        res["agreement"], cache = timed("agreement", bench_agreement, unc_dir, work, ps)
        res["sweep"] = timed("sweep", bench_sweep_ranking, cache, work, ps)
    finally:
        ray.shutdown()
    load1 = os.getloadavg()
    res["load_average"] = {"start": load0[0], "end": load1[0]}
    res["contended"] = max(load0[0], load1[0]) > (os.cpu_count() or 1)
    res["seconds"]["total"] = time.perf_counter() - t_start
    return res


def headline(r: dict) -> dict:
    """The part's top-level keys for bench/run.py's result object."""
    m, e, a = r["matmul"], r["extract"], r["agreement"]
    return {"cpu_bf16_flag": r["cpu_bf16_flag"],
            "matmul_gflops_float32": m["gflops_float32"], "matmul_gflops_bfloat16": m["gflops_bfloat16"],
            "matmul_peak_probe_float32": m["peak_probe_float32"], "matmul_peak_probe_bfloat16": m["peak_probe_bfloat16"],
            "extract_images_per_s_float32": e["images_per_s_float32"],
            "extract_images_per_s_bfloat16": e["images_per_s_bfloat16"], "extract_bf16_ratio": e["bf16_ratio"],
            "extract_fraction_of_peak_float32": e["fraction_of_peak_float32"],
            "extract_fraction_of_peak_bfloat16": e["fraction_of_peak_bfloat16"],
            "predict_images_per_s_float32": r["predict"]["images_per_s_float32"],
            "predict_images_per_s_bfloat16": r["predict"]["images_per_s_bfloat16"],
            "predict_bf16_ratio": r["predict"]["bf16_ratio"],
            "agreement_max_abs_prob_diff": a["max_abs_prob_diff"], "agreement_auroc_diff": a["auroc_diff"],
            "agreement_bound": AGREEMENT_BOUND, "sweep_ranking_same": r["sweep"]["ranking_same"],
            "sweep_ranking_float32": r["sweep"]["ranking_float32"],
            "sweep_ranking_bfloat16": r["sweep"]["ranking_bfloat16"]}
