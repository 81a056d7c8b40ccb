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
