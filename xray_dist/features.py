"""Shared frozen features: the activations at VGG16's frozen boundary, computed once per
(cache, weights, unfreeze depth) and reused by every sweep trial with that depth.

With the top D blocks trainable, blocks 1..5−D are frozen, so for a given cache and base weights
their output never changes between trials or epochs. Computing it once (in parallel, with a Ray
Data actor pool) and training only blocks 5−D+1..5 and the head on it gives the same model for a
fraction of the FLOPs. Nothing here augments inputs: xray-dist trains without per-epoch input
augmentation, which is what makes the shortcut exact (a run with augmentation must not use it).

Layout: ``CACHE/features/<key>/`` with Parquet shards (``path``, ``x`` float32 tensor) and
``meta.json`` (the boundary layer, the feature shape, the key's ingredients).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from xray_dist.config import stable_hash

log = logging.getLogger(__name__)

FEATURES_DIR = "features"


def boundary_layer(unfreeze_blocks: int) -> str | None:
    """The last frozen layer for depth D (None when nothing is frozen, D = 5)."""
    return None if unfreeze_blocks >= 5 else f"block{5 - unfreeze_blocks}_pool"


def features_key(cache: str | Path, weights: str, seed: int, unfreeze_blocks: int) -> str:
    from xray_dist.dataset import COMPLETE, IMAGES_DIR

    images_key = json.loads((Path(cache) / IMAGES_DIR / COMPLETE).read_text())["key"]
    w = weights if weights in ("imagenet", "none") else f"{Path(weights).resolve()}:{Path(weights).stat().st_mtime_ns}"
    return stable_hash({"images": images_key, "weights": w, "seed": seed if weights == "none" else None,
                        "depth": unfreeze_blocks})


class _Extractor:
    """Ray Data actor: the frozen part of VGG16 (built once per actor), images → boundary activations."""

    def __init__(self, image_size: int, weights: str, seed: int, unfreeze_blocks: int):
        import tf_keras as keras

        from xray_dist.model import frozen_part

        keras.utils.set_random_seed(seed)  # weights="none": the same random base as the uncached model
        self.model = frozen_part(image_size, weights, unfreeze_blocks)

    def __call__(self, batch: dict) -> dict:
        x = np.asarray(self.model(batch["image"], training=False), dtype=np.float32)
        return {"path": batch["path"], "x": x}


def ensure_features(cache: str | Path, weights: str, seed: int, unfreeze_blocks: int,
                    concurrency: int = 2) -> Path | None:
    """The feature directory for this (cache, weights, depth), computed now if missing."""

    from xray_dist.dataset import IMAGES_DIR, load_spec, read_cache_parquet

    layer = boundary_layer(unfreeze_blocks)
    if layer is None:
        return None
    key = features_key(cache, weights, seed, unfreeze_blocks)
    out = Path(cache) / FEATURES_DIR / key
    meta_path = out / "meta.json"
    if meta_path.is_file():
        return out
    if out.exists():
        shutil.rmtree(out)  # an interrupted extraction
    size = load_spec(cache).image_size
    log.info("computing frozen features at %s for depth %d (once per cache, weights and depth)", layer, unfreeze_blocks)
    ds = read_cache_parquet(Path(cache) / IMAGES_DIR, ["path", "image", "error"], 0.25)
    ds = ds.filter(lambda r: not r["error"]).select_columns(["path", "image"])
    ds = ds.map_batches(_Extractor, fn_constructor_kwargs={"image_size": size, "weights": weights, "seed": seed,
                                                           "unfreeze_blocks": unfreeze_blocks},
                        batch_size=32, batch_format="numpy", concurrency=concurrency, num_cpus=0.5)
    ds.write_parquet(str(out / "shards"))
    from xray_dist.model import frozen_part

    shape = list(frozen_part(size, "none", unfreeze_blocks).output_shape[1:])
    meta_path.write_text(json.dumps({"layer": layer, "shape": shape, "unfreeze_blocks": unfreeze_blocks,
                                     "weights": weights, "seed": seed, "key": key}))
    return out


def read_meta(features: str | Path) -> dict:
    return json.loads((Path(features) / "meta.json").read_text())
