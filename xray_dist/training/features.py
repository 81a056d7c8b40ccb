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

import logging
from pathlib import Path

import numpy as np

from xray_dist.infra import storage
from xray_dist.config import stable_hash

log = logging.getLogger(__name__)

FEATURES_DIR = "features"


def boundary_layer(unfreeze_blocks: int) -> str | None:
    """The last frozen layer for depth D (None when nothing is frozen, D = 5)."""
    return None if unfreeze_blocks >= 5 else f"block{5 - unfreeze_blocks}_pool"


def features_key(cache: str | Path, weights: str, seed: int, unfreeze_blocks: int) -> str:
    from xray_dist.data.cache import COMPLETE, IMAGES_DIR

    images_key = storage.read_json(storage.join(cache, IMAGES_DIR, COMPLETE))["key"]
    # a weights file counts by its content, wherever it lives and whatever its name
    w = weights if weights in ("imagenet", "none") else "sha256:" + storage.content_sha256(weights)
    return stable_hash({"images": images_key, "weights": w, "seed": seed if weights == "none" else None,
                        "depth": unfreeze_blocks})


class _Extractor:
    """Ray Data actor: the frozen part of VGG16 (built once per actor), images → boundary activations."""

    def __init__(self, image_size: int, weights: str, seed: int, unfreeze_blocks: int):
        import tf_keras as keras

        from xray_dist.model.network import frozen_part

        keras.utils.set_random_seed(seed)  # weights="none": the same random base as the uncached model
        self.model = frozen_part(image_size, weights, unfreeze_blocks)

    def __call__(self, batch: dict) -> dict:
        x = np.asarray(self.model(batch["image"], training=False), dtype=np.float32)
        return {"path": batch["path"], "x": x}


def ensure_features(cache: str | Path, weights: str, seed: int, unfreeze_blocks: int, where: str = "auto",
                    concurrency: int = 2) -> str | None:
    """The feature directory for this (cache, weights, depth), computed now if missing.

    ``where``: ``"here"`` runs the frozen base in this process, one model on all its cores;
    ``"ray"`` in a Ray Data pool of ``concurrency`` actors, which spreads a large cache over a
    cluster's nodes but costs each actor a fresh TensorFlow process (~5-10 s on a small machine);
    ``"auto"``: here on a single node without GPUs (a laptop, CI), Ray elsewhere."""
    layer = boundary_layer(unfreeze_blocks)
    if layer is None:
        return None
    key = features_key(cache, weights, seed, unfreeze_blocks)
    out = storage.join(cache, FEATURES_DIR, key)
    meta_path = storage.join(out, "meta.json")
    if storage.is_file(meta_path):
        return out
    from xray_dist.infra.locks import TargetLock

    with TargetLock(out, "frozen-feature extraction"):  # two sweeps on one cache: one extracts
        if storage.is_file(meta_path):  # the other finished it while this one waited for nothing
            return out
        _extract(cache, out, meta_path, layer, key, weights, seed, unfreeze_blocks, where, concurrency)
    return out


def _extract(cache: str, out: str, meta_path: str, layer: str, key: str, weights: str, seed: int,
             unfreeze_blocks: int, where: str, concurrency: int) -> None:
    storage.delete_dir(storage.join(out, "shards"))  # an interrupted extraction (nothing when absent)
    if where == "auto":
        where, why = extraction_place()
        log.debug("frozen features: extracting %s (%s)", "in this process" if where == "here" else "on the cluster", why)
    if where not in ("here", "ray"):
        raise ValueError(f"where={where!r}: expected 'auto', 'here' or 'ray'")
    log.debug("computing frozen features at %s for depth %d (once per cache, weights and depth; %s)", layer,
             unfreeze_blocks, "in this process" if where == "here" else f"{concurrency} Ray Data actors")
    shards = storage.join(out, "shards")
    if where == "here":
        shape = _extract_here(cache, shards, weights, seed, unfreeze_blocks)
    else:
        shape = _extract_with_ray(cache, shards, weights, seed, unfreeze_blocks, concurrency)
    storage.write_json(meta_path, {"layer": layer, "shape": shape, "unfreeze_blocks": unfreeze_blocks,
                                   "weights": weights, "seed": seed, "key": key})  # written last: complete


def extraction_place() -> tuple[str, str]:
    """Where :func:`ensure_features` runs the frozen base, and why.

    In this process only on a single node without GPUs whose own CPUs are there to use (a laptop,
    CI). A node with no CPUs for work — the usual head of an autoscaling cluster, started with
    ``--num-cpus 0`` — extracts on the cluster (Ray Data asks for the resources, the autoscaler
    starts workers for them), whatever is up at the moment.
    """
    import ray

    if not ray.is_initialized():
        return "here", "no Ray cluster"
    alive = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    mine = next((n for n in alive if n.get("NodeID") == here), None)
    my_cpus = float((mine or {}).get("Resources", {}).get("CPU", 0))
    if ray.cluster_resources().get("GPU"):
        return "ray", "the cluster has GPUs"
    if len(alive) > 1:
        return "ray", f"{len(alive)} nodes"
    if my_cpus <= 0:
        return "ray", "this node offers no CPUs to Ray (an autoscaling cluster's head)"
    return "here", "a single CPU-only node"


def _single_cpu_node() -> bool:
    return extraction_place()[0] == "here"


def _extract_here(cache: str, shards: str, weights: str, seed: int, unfreeze_blocks: int) -> list:
    """The frozen base in this process over the cache's readable rows, 256 rows per Parquet shard
    (Ray Data's tensor column type, so readers cannot tell the two ways apart)."""
    import pyarrow.compute as pc
    import tf_keras as keras
    from ray.data.block import BlockAccessor

    from xray_dist.infra.console import Progress

    from xray_dist.data.cache import tensor_column_to_numpy as _tensor_column_to_numpy, images_dataset, load_spec
    from xray_dist.model.network import frozen_part

    size = load_spec(cache).image_size
    keras.utils.set_random_seed(seed)  # weights="none": the same random base as the uncached model
    model = frozen_part(size, weights, unfreeze_blocks)
    storage.makedirs(shards)
    dset = images_dataset(cache)
    ok = pc.field("error").is_null() | (pc.field("error") == "")
    with Progress(dset.count_rows(filter=ok), f"frozen features (depth {unfreeze_blocks})", unit="image") as bar:
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
            storage.write_parquet(block, storage.join(shards, f"part-{i:05d}.parquet"))
    shape = list(model.output_shape[1:])
    del model
    keras.backend.clear_session()
    return shape


def _extract_with_ray(cache: str, shards: str, weights: str, seed: int, unfreeze_blocks: int,
                      concurrency: int) -> list:
    from xray_dist.data.cache import IMAGES_DIR, load_spec, read_cache_parquet
    from xray_dist.model.network import frozen_part

    size = load_spec(cache).image_size
    ds = read_cache_parquet(storage.join(cache, IMAGES_DIR), ["path", "image", "error"], 0.25)
    ds = ds.filter(lambda r: not r["error"]).select_columns(["path", "image"])
    ds = ds.map_batches(_Extractor, fn_constructor_kwargs={"image_size": size, "weights": weights, "seed": seed,
                                                           "unfreeze_blocks": unfreeze_blocks},
                        batch_size=32, batch_format="numpy", concurrency=concurrency, num_cpus=0.5)
    path, fs = storage.ray_storage(shards)
    ds.write_parquet(path, filesystem=fs)
    return list(frozen_part(size, "none", unfreeze_blocks).output_shape[1:])


def read_meta(features: str | Path) -> dict:
    return storage.read_json(storage.join(features, "meta.json"))
