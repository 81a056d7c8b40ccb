"""``xray-dist demo``: the local single-node test mode, end to end on embedded Ray and the CPU."""

from __future__ import annotations

import time
from pathlib import Path


def run_demo(out: str | Path, num_cpus: int | None = None) -> dict:
    from xray_dist.cli import format_prepare_summary
    from xray_dist.config import PrepareConfig, PreprocessSpec
    from xray_dist.dataset import prepare
    from xray_dist.synth import synthesize

    out = Path(out)
    t0 = time.time()
    print(f"[demo 1/2] synth: synthetic chest radiographs -> {out / 'data'}")
    syn = synthesize(out / "data", patients=48, images_per_patient=2, size=128, seed=7)
    print(f"           {len(syn.files)} DICOM files in 8 encodings")
    print(f"[demo 2/2] prepare: decode once with Ray Data -> {out / 'cache'}")
    report = prepare(PrepareConfig(data_dir=str(out / "data"), labels=str(syn.labels_csv), out=str(out / "cache"),
                                   preprocess=PreprocessSpec(image_size=64), num_cpus=num_cpus))
    print(format_prepare_summary(report, str(out / "cache")))
    print(f"demo finished in {time.time() - t0:.0f} s; outputs in {out}")
    return {"prepare": report}
