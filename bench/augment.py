"""Does ``--augment light`` help where the finding moves? One measurement, side by side in one run.

    python bench/augment.py [--work DIR] [--json OUT] [--seeds 0,1]

A synthetic cohort (real DICOM files, prepared at 48 px, the finding at a quarter of its contrast) trains two runs that differ only in
``--augment`` (none, light): every VGG block trainable, random initial weights, the same seed,
epochs and batches. Both are scored on the same held-out test patients twice: as prepared, and
with every test image moved (a shift of up to 4 px each way, NumPy's ``roll`` with the edge
repeated, not the augmentation's own transform), which moves the finding away from where training
saw it. AUROC of the abnormal score on each, per seed; the question is whether the augmented run
loses less on the moved images.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _moved(images: np.ndarray, rng: np.random.Generator, most: int = 4) -> np.ndarray:
    out = np.empty_like(images)
    for i, img in enumerate(images):
        dy, dx = rng.integers(-most, most + 1, size=2)
        padded = np.pad(img, most, mode="edge")
        out[i] = padded[most - dy: most - dy + img.shape[0], most - dx: most - dx + img.shape[1]]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--strength", type=float, default=0.25, help="the finding's contrast (1: synth's usual)")
    a = p.parse_args(argv)
    from xray_dist.config import PrepareConfig, PreprocessSpec, TrainConfig
    from xray_dist.data.cache import load_manifest, load_split_arrays
    from xray_dist.data.prepare import prepare
    from xray_dist.data.synth import synthesize
    from xray_dist.model.artifacts import load_run_model, predict_arrays
    from xray_dist.results.metrics import auroc
    from xray_dist.training.driver import train

    work = Path(a.work or tempfile.mkdtemp(prefix="xray_aug_"))
    # a subtle finding (a quarter of its usual contrast): the plain synthetic one is found perfectly either way
    syn = synthesize(work / "data", patients=80, images_per_patient=2, size=96, seed=11, encodings=("mono2_u8",),
                     sites=1, subtle_site=0, subtle_strength=a.strength)
    prepare(PrepareConfig(data_dir=str(syn.out), labels=str(syn.labels_csv), out=str(work / "cache"),
                          preprocess=PreprocessSpec(image_size=48), val_fraction=0.2, test_fraction=0.4, seed=4))
    paths, images = load_split_arrays(work / "cache", "test")
    label = dict(zip(*[load_manifest(work / "cache").column(c).to_pylist() for c in ("path", "label")]))
    truth = np.array([label[q] != "normal" for q in paths], dtype=int)
    moved = _moved(images, np.random.default_rng(0))
    result = {"test_images": len(paths), "epochs": a.epochs, "image_size": 48, "strength": a.strength, "runs": []}
    for seed in (int(s) for s in a.seeds.split(",")):
        for aug in ("none", "light"):
            t0 = time.time()
            out = work / f"run-{aug}-{seed}"
            train(TrainConfig(cache=str(work / "cache"), out=str(out), epochs=a.epochs, batch_size=8, lr=1e-4,
                              weights="none", unfreeze_blocks=5, num_workers=1, cpus_per_worker=0.5, seed=seed,
                              augment=aug))
            lm = load_run_model(out)
            row = {"seed": seed, "augment": aug, "seconds": round(time.time() - t0, 1),
                   "auc_test": auroc(truth, predict_arrays(lm, images)[:, 1]),
                   "auc_test_moved": auroc(truth, predict_arrays(lm, moved)[:, 1])}
            row["drop"] = row["auc_test"] - row["auc_test_moved"]
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
    text = json.dumps(result, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
