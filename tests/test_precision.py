"""--precision: what auto picks from the CPU's flags, bfloat16 that agrees with float32 on the same
images, float32 weights whatever ran, frozen features that never mix. (Exact resume of a bfloat16
run: tests/test_train.py::test_rerun_same_out_resumes_exactly, whose auto runs compute in bfloat16
on a CPU with the instructions, and say so.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xray_dist.config import TrainConfig
from xray_dist.model.precision import cpu_bf16_flag, resolve

#: How far bfloat16 inference may move a probability and an AUROC from float32's on the same images
#: (bfloat16 keeps 8 significant bits: about 0.4 % per rounding; BENCHMARKS.md has the measured values).
MAX_PROB_DIFF = 0.02
MAX_AUROC_DIFF = 0.02

HERE = cpu_bf16_flag()
needs_bf16 = pytest.mark.skipif(
    HERE is None, reason="this CPU has neither amx_bf16 nor avx512_bf16 (/proc/cpuinfo): bfloat16 would be emulated, "
                         "and auto never picks it here; the bfloat16 path is tested on CPUs that have it (CI does)")


def cpuinfo(tmp_path: Path, flags: str) -> Path:
    p = tmp_path / f"cpuinfo-{abs(hash(flags))}"
    p.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme sse sse2 avx2 " + flags + "\n\n"
                 "processor\t: 1\nflags\t\t: fpu vme sse sse2 avx2 " + flags + "\n")
    return p


def test_auto_follows_the_cpu_flags_and_the_gpu(tmp_path):
    assert cpu_bf16_flag(cpuinfo(tmp_path, "avx512f avx512_bf16 amx_tile amx_bf16")) == "amx_bf16"
    assert cpu_bf16_flag(cpuinfo(tmp_path, "avx512f avx512_bf16")) == "avx512_bf16"
    assert cpu_bf16_flag(cpuinfo(tmp_path, "avx512f avx512_vnni")) is None
    assert cpu_bf16_flag(tmp_path / "no-such-file") is None  # not Linux: no claim
    cpu = dict(gpu_major=None)
    for training in (False, True):
        assert resolve("auto", training, cpu_flag="amx_bf16", **cpu).policy == "mixed_bfloat16"
        assert "amx_bf16" in resolve("auto", training, cpu_flag="amx_bf16", **cpu).why
        assert resolve("auto", training, cpu_flag=None, **cpu).policy == "float32"
        assert resolve("float32", training, cpu_flag="amx_bf16", **cpu).policy == "float32"
        assert resolve("bfloat16", training, cpu_flag="avx512_bf16", **cpu).policy == "mixed_bfloat16"
    slow = resolve("bfloat16", False, cpu_flag=None, **cpu)
    assert slow.policy == "mixed_bfloat16" and "emulated" in slow.why and slow.name == "bfloat16"
    # GPUs keep what they did: inference in float32, training in bf16 (8.x+) or fp16
    assert resolve("auto", False, gpu_major=8, cpu_flag="amx_bf16").policy == "float32"
    assert resolve("auto", True, gpu_major=8, cpu_flag=None).policy == "mixed_bfloat16"
    assert resolve("auto", True, gpu_major=7, cpu_flag="amx_bf16").policy == "mixed_float16"
    with pytest.raises(ValueError, match="precision"):
        resolve("half", False)
    with pytest.raises(Exception, match="precision"):
        TrainConfig(cache="c", out="o", precision="fp8")


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Ground truth for the test: the share of (positive, negative) pairs ranked right, ties half."""
    pos, neg = s[y == 1], s[y == 0]
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
                 / (len(pos) * len(neg)))


@needs_bf16
def test_bfloat16_inference_agrees_with_float32_and_computes_in_bfloat16(two_worker_run, synth_binary, tmp_path):
    import h5py

    from xray_dist.inference.predict import predict_files
    from xray_dist.model.artifacts import load_run_model
    from xray_dist.results.evaluate import evaluate_model

    _, cache, run = two_worker_run
    lm = load_run_model(run, "bfloat16")
    convs = [layer for layer in _layers(lm.model) if type(layer).__name__ == "Conv2D"]
    assert len(convs) == 13 and all(c.compute_dtype == "bfloat16" for c in convs)
    assert lm.model.get_layer("logits").compute_dtype == "float32"
    assert {w.dtype.name for w in lm.model.weights} == {"float32"}  # weights stay float32
    with h5py.File(Path(run) / "model" / "weights.h5") as f:  # and so does what training stored
        dtypes = set()
        f.visititems(lambda n, o: dtypes.add(str(o.dtype)) if isinstance(o, h5py.Dataset) else None)
    assert dtypes == {"float32"}
    files = sorted(str(f) for f in synth_binary.files)
    truth = np.asarray([synth_binary.labels[str(Path(f).relative_to(synth_binary.out))] != "normal" for f in files])
    scores = {}
    for precision in ("float32", "bfloat16"):
        rows = predict_files(run, files, tmp_path / f"{precision}.csv", engine="local", precision=precision)
        assert not any(r["error"] for r in rows)
        scores[precision] = np.asarray([[r["p_normal"], r["p_finding"]] for r in rows], dtype=float)
    diff = np.abs(scores["bfloat16"] - scores["float32"])
    assert 0 < diff.max() <= MAX_PROB_DIFF  # bfloat16 really ran (not a float32 run twice), and agrees
    aurocs = [_auroc(truth.astype(int), scores[p][:, 1]) for p in ("float32", "bfloat16")]
    assert abs(aurocs[0] - aurocs[1]) <= MAX_AUROC_DIFF, aurocs
    ev = {p: evaluate_model(str(run), str(cache), "val", out=str(tmp_path / f"ev-{p}"), n_boot=100, precision=p)
          for p in ("float32", "bfloat16")}
    assert ev["float32"]["precision"] == "float32" and ev["bfloat16"]["precision"] == "bfloat16"
    assert abs(ev["float32"]["auc_abnormal"]["value"] - ev["bfloat16"]["auc_abnormal"]["value"]) <= MAX_AUROC_DIFF


def read_features(features: str) -> dict:
    """Each image's activations in a feature directory, by its cache path, in path order."""
    import pyarrow.parquet as pq

    out = {}
    for shard in sorted((Path(features) / "shards").glob("*.parquet")):
        t = pq.read_table(shard)
        x = t.column("x").combine_chunks().to_numpy_ndarray()
        out.update(zip(t.column("path").to_pylist(), x))
    return dict(sorted(out.items()))


def _layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _layers(layer)


@needs_bf16
def test_bfloat16_features_have_their_own_directory_and_agree(prepared_binary, tmp_path):
    import shutil

    from xray_dist.data.cache import FEATURES_DIR
    from xray_dist.training.features import ensure_features, read_meta

    _, prepared = prepared_binary
    cache = tmp_path / "cache"
    shutil.copytree(prepared, cache, ignore=shutil.ignore_patterns(FEATURES_DIR))
    f32 = ensure_features(cache, "none", 0, 1, where="here", precision="float32")
    bf16 = ensure_features(cache, "none", 0, 1, where="here", precision="bfloat16")
    assert f32 != bf16 and read_meta(f32)["precision"] == "float32" and read_meta(bf16)["precision"] == "bfloat16"
    assert ensure_features(cache, "none", 0, 1, where="here", precision="auto") == bf16  # auto here is bfloat16
    a, b = read_features(f32), read_features(bf16)
    assert list(a) == list(b)
    x, y = np.stack(list(a.values())), np.stack(list(b.values()))
    assert not np.array_equal(x, y)
    assert np.abs(x - y).max() <= 0.05 * np.abs(x).max()  # a few bf16 roundings through four VGG blocks


def test_resuming_in_another_precision_says_it_is_not_exact(prepared_binary, tmp_path, caplog):
    """The checkpoint records what the run computed in. Resumed in the same precision: resumed exactly,
    nothing to warn about; in another (a machine without AMX under ``auto``, or another --precision):
    one warning naming both, and the resume line says it is not the uninterrupted run."""
    import logging

    from xray_dist.training.inprocess import train_in_process

    cfg = dict(cache=str(prepared_binary[1]), out=str(tmp_path / "run"), batch_size=8, lr=1e-4, weights="none",
               unfreeze_blocks=1)
    train_in_process(TrainConfig(epochs=1, precision="bfloat16", **cfg))
    with caplog.at_level(logging.INFO, logger="xray_dist"):
        train_in_process(TrainConfig(epochs=2, precision="bfloat16", **cfg))
    said = caplog.text
    assert "resuming from the checkpoint after epoch 1 (exactly" in said and "not the ones" not in said, said
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="xray_dist"):
        train_in_process(TrainConfig(epochs=3, precision="float32", **cfg))
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "resuming a run" in r.getMessage()]
    assert len(warned) == 1 and "computed in bfloat16, now in float32" in warned[0].getMessage(), caplog.text
    assert "after epoch 2 (computed in float32 where the run computed in bfloat16" in caplog.text
