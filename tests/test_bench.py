"""bench/run.py runs both sides for real and reports ratios with their raw figures (structure
only: speed is claimed from the benchmark itself, never from a test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_smoke_run_reports_ratios_from_raw_figures(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--only", "j2k,input,s3,dicomweb,predict", "--gpu",
                           "--json", str(out), "--work", str(tmp_path / "w")], capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    j = r["j2k_reduce"]
    assert r["j2k_reduce_ratio"] == pytest.approx(j["reduced_images_per_s"] / j["full_images_per_s"])
    # the reduced decode's model inputs are within the stated tolerance of the full decode's
    assert j["mean_abs_diff"] <= j["tolerance"]["mean_abs"] and j["p99_abs_diff"] <= j["tolerance"]["p99_abs"], j
    assert j["within_tolerance"]
    assert j["reduced_shapes"] and j["source_px"] == 512  # the reduced path really ran
    i = r["input"]
    assert r["input_ratio"] == pytest.approx(i["ours_images_per_s"] / i["naive_images_per_s"])
    assert len(i["ours_epochs"]) == len(i["naive_epochs"]) == 2
    assert all(e["images"] > 0 and e["seconds"] > 0 for e in i["ours_epochs"] + i["naive_epochs"])
    assert set(r["gpu"]["train"]) == {f"{p}_unfreeze{d}" for p in ("float32", "mixed_bfloat16") for d in (0, 1, 5)}
    s3 = r["s3_prepare"]
    assert len(s3["local_seconds"]) == len(s3["s3_seconds"]) == 2 and s3["files"] > 0
    assert r["s3_prepare_ratio"] == pytest.approx(min(s3["local_seconds"]) / min(s3["s3_seconds"]))
    web = r["dicomweb_prepare"]
    assert len(web["local_seconds"]) == len(web["dicomweb_seconds"]) == 2 and web["files"] > 0, web
    assert r["dicomweb_prepare_ratio"] == pytest.approx(min(web["local_seconds"]) / min(web["dicomweb_seconds"]))
    pr = r["predict"]
    assert r["predict_scaling"] == pytest.approx(pr["2cpu_images_per_s"] / pr["1cpu_images_per_s"])
    assert pr["files"] > 0 and pr["1cpu_images_per_s"] > 0
    assert r["machine"]["cpus"] >= 1 and "met" in r
    assert set(r["met"]) == {"input_ratio", "j2k_reduce_ratio", "s3_prepare_ratio", "dicomweb_prepare_ratio",
                             "predict_scaling"}


def test_precision_part_measures_both_formats_and_ranks_sweeps(tmp_path):
    """bench/precision.py's pieces at toy sizes (the whole part needs Ray Train and two sweeps):
    FLOPs from VGG16's layer shapes, both formats timed with their fraction of the matmul peak, and
    a sweep's results.csv ranked best first with ties kept apart from real differences."""
    sys.path.insert(0, str(REPO / "bench"))
    import precision

    assert precision.vgg16_conv_gflop(224) == pytest.approx(30.69, abs=0.01)  # 15.35 GMACs
    peaks = precision.matmul_peaks(256, 0.2)
    assert peaks["gflops_float32"] > 0 and peaks["gflops_bfloat16"] > 0
    for p in ("float32", "bfloat16"):  # the peak is the best probe, matmuls and convolutions alike
        probes = peaks["probes"][p]
        assert {"matmul_256", "conv3x3_56px_256ch"} <= set(probes) and peaks[f"gflops_{p}"] == max(probes.values())
    e = precision.bench_extract(32, 2, 0.2, peaks)
    assert e["policies"] == {"float32": "float32", "bfloat16": "mixed_bfloat16"}
    assert e["bf16_ratio"] == pytest.approx(e["images_per_s_bfloat16"] / e["images_per_s_float32"])
    assert e["fraction_of_peak_float32"] == pytest.approx(
        e["images_per_s_float32"] * precision.vgg16_conv_gflop(32) / peaks["gflops_float32"])
    assert 0 < e["features_rel_diff"] < 0.1  # bfloat16 really ran, and still computes the same features
    results = tmp_path / "results.csv"
    results.write_text("trial,head_width,unfreeze_blocks,val_auc_abnormal,status\n"
                       "t0,0,0,0.5,completed\nt1,16,0,1.0,completed\nt2,0,1,1.0,completed\nt3,16,1,,failed\n")
    ranking, rows = precision._ranking(results)
    assert ranking == [(0, 1), (16, 0), (0, 0), (16, 1)]  # ties by (width, depth); a failed trial last
    assert precision._tie_groups(rows[:3]) == [[(0, 1), (16, 0)], [(0, 0)]]
    # only strict reversals count: y and z tie in float32, so their order in bfloat16 is no discord
    assert precision._discordant({"x": 1.0, "y": 0.5, "z": 0.5}, {"x": 0.4, "y": 0.6, "z": 0.9}) == [["x", "y"],
                                                                                                    ["x", "z"]]
