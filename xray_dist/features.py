"""Shared frozen features: the activations at VGG16's frozen boundary, computed once per
(cache, weights, unfreeze depth) and reused by every sweep trial with that depth.

With the top D blocks trainable, blocks 1..5−D are frozen, so for a given cache and base weights
their output never changes between trials or epochs. Computing it once (in this process on a
single CPU node, else with a Ray Data actor pool) and training only blocks 5−D+1..5 and the head
on it gives the same model for a fraction of the FLOPs. Nothing here augments inputs: xray-dist trains without per-epoch input
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


def ensure_features(cache: str | Path, weights: str, seed: int, unfreeze_blocks: int, where: str = "auto",
                    concurrency: int = 2) -> Path | None:
    """The feature directory for this (cache, weights, depth), computed now if missing.

    ``where``: ``"here"`` runs the frozen base in this process, one model on all its cores;
    ``"ray"`` in a Ray Data pool of ``concurrency`` actors, which spreads a large cache over a
    cluster's nodes but costs each actor a fresh TensorFlow process (~5-10 s on a small machine);
    ``"auto"``: here on a single node without GPUs (a laptop, CI), Ray elsewhere."""
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
    if where == "auto":
        where = "here" if _single_cpu_node() else "ray"
    if where not in ("here", "ray"):
        raise ValueError(f"where={where!r}: expected 'auto', 'here' or 'ray'")
    log.info("computing frozen features at %s for depth %d (once per cache, weights and depth; %s)", layer,
             unfreeze_blocks, "in this process" if where == "here" else f"{concurrency} Ray Data actors")
    if where == "here":
        shape = _extract_here(Path(cache), out / "shards", weights, seed, unfreeze_blocks)
    else:
        shape = _extract_with_ray(Path(cache), out / "shards", weights, seed, unfreeze_blocks, concurrency)
    meta_path.write_text(json.dumps({"layer": layer, "shape": shape, "unfreeze_blocks": unfreeze_blocks,
                                     "weights": weights, "seed": seed, "key": key}))
    return out


def _single_cpu_node() -> bool:
    import ray

    if not ray.is_initialized():
        return True
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return len(alive) <= 1 and not ray.cluster_resources().get("GPU")


def _extract_here(cache: Path, shards: Path, weights: str, seed: int, unfreeze_blocks: int) -> list:
    """The frozen base in this process over the cache's readable rows, 256 rows per Parquet shard
    (Ray Data's tensor column type, so readers cannot tell the two ways apart)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    import tf_keras as keras
    from ray.data.block import BlockAccessor
    from tqdm import tqdm

    from xray_dist.dataset import IMAGES_DIR, _tensor_column_to_numpy, load_spec
    from xray_dist.model import frozen_part

    size = load_spec(cache).image_size
    keras.utils.set_random_seed(seed)  # weights="none": the same random base as the uncached model
    model = frozen_part(size, weights, unfreeze_blocks)
    shards.mkdir(parents=True)
    dset = pads.dataset(cache / IMAGES_DIR, format="parquet")
    ok = pc.field("error").is_null() | (pc.field("error") == "")
    with tqdm(total=dset.count_rows(filter=ok), desc=f"frozen features (depth {unfreeze_blocks})", unit="img") as bar:
        for i, rb in enumerate(dset.to_batches(columns=["path", "image"], filter=ok, batch_size=256)):
            if rb.num_rows == 0:
                continue
            images = _tensor_column_to_numpy(rb.column("image"), size)
            x = []
            for j in range(0, len(images), 32):
                x.append(np.asarray(model(images[j : j + 32], training=False), dtype=np.float32))
                bar.update(len(x[-1]))
            block = BlockAccessor.batch_to_block({"path": np.asarray(rb.column("path").to_pylist(), dtype=object),
                                                  "x": np.concatenate(x)})
            pq.write_table(block, shards / f"part-{i:05d}.parquet")
    shape = list(model.output_shape[1:])
    del model
    keras.backend.clear_session()
    return shape


def _extract_with_ray(cache: Path, shards: Path, weights: str, seed: int, unfreeze_blocks: int,
                      concurrency: int) -> list:
    from xray_dist.dataset import IMAGES_DIR, load_spec, read_cache_parquet
    from xray_dist.model import frozen_part

    size = load_spec(cache).image_size
    ds = read_cache_parquet(cache / IMAGES_DIR, ["path", "image", "error"], 0.25)
    ds = ds.filter(lambda r: not r["error"]).select_columns(["path", "image"])
    ds = ds.map_batches(_Extractor, fn_constructor_kwargs={"image_size": size, "weights": weights, "seed": seed,
                                                           "unfreeze_blocks": unfreeze_blocks},
                        batch_size=32, batch_format="numpy", concurrency=concurrency, num_cpus=0.5)
    ds.write_parquet(str(shards))
    return list(frozen_part(size, "none", unfreeze_blocks).output_shape[1:])


def read_meta(features: str | Path) -> dict:
    return json.loads((Path(features) / "meta.json").read_text())
