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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from xray_dist.config import stable_hash
from xray_dist.data.cache import (CacheLayout, images_dataset, images_key, load_spec, read_cache_parquet,
                                  tensor_column_to_numpy)
from xray_dist.infra import storage
from xray_dist.infra.console import Progress
from xray_dist.infra.locks import TargetLock
from xray_dist.model.precision import concrete, keras_policy

log = logging.getLogger(__name__)


def boundary_layer(unfreeze_blocks: int) -> str | None:
    """The last frozen layer for depth D (None when nothing is frozen, D = 5)."""
    return None if unfreeze_blocks >= 5 else f"block{5 - unfreeze_blocks}_pool"


def features_key(cache: str | Path, weights: str, seed: int, unfreeze_blocks: int, precision: str = "float32") -> str:
    """The feature directory's name: what decides its activations. ``precision`` is the arithmetic
    they were computed in (``float32`` or ``bfloat16``; float32 keeps the keys features always had)."""
    # a weights file counts by its content, wherever it lives and whatever its name
    w = weights if weights in ("imagenet", "none") else "sha256:" + storage.content_sha256(weights)
    key = {"images": images_key(cache), "weights": w, "seed": seed if weights == "none" else None,
           "depth": unfreeze_blocks}
    # bfloat16 features computed eagerly (before every path went through network.scorer) round
    # differently from the compiled pass by about 1e-3: a new key, so they are not reused
    return stable_hash(key if precision == "float32" else {**key, "precision": precision, "pass": "compiled"})


class _Extractor:
    """Ray Data actor: the frozen part of VGG16 (built once per actor), images → boundary activations."""

    def __init__(self, image_size: int, weights: str, seed: int, unfreeze_blocks: int, precision: str = "float32"):
        import tf_keras as keras  # TensorFlow: in the extracting process only

        from xray_dist.model.network import frozen_part, scorer  # imports TensorFlow

        keras.utils.set_random_seed(seed)  # weights="none": the same random base as the uncached model
        with keras_policy(precision):  # the driver's resolved choice, whatever this node's CPU
            self.model = frozen_part(image_size, weights, unfreeze_blocks)
        self.run = scorer(self.model)

    def __call__(self, batch: dict) -> dict:
        x = self.run(batch["image"]).astype(np.float32)
        return {"path": batch["path"], "x": x}


@dataclass(frozen=True)
class Extraction:
    """One feature directory to compute: the frozen base of (``weights``, ``seed``) up to depth
    ``unfreeze_blocks``'s boundary over ``cache``'s images, into ``out``; ``where`` and
    ``concurrency`` as :func:`ensure_features` takes them."""

    cache: str
    out: str
    weights: str
    seed: int
    unfreeze_blocks: int
    where: str = "auto"
    concurrency: int = 2
    precision: str = "float32"  # resolved on the driver: float32 or bfloat16

    @property
    def layer(self) -> str:
        return boundary_layer(self.unfreeze_blocks)

    @property
    def shards(self) -> str:
        return storage.join(self.out, "shards")

    @property
    def meta_path(self) -> str:
        return storage.join(self.out, "meta.json")


def ensure_features(cache: str | Path, weights: str, seed: int, unfreeze_blocks: int, where: str = "auto",
                    concurrency: int = 2, precision: str = "auto") -> str | None:
    """The feature directory for this (cache, weights, depth), computed now if missing.

    ``where``: ``"here"`` runs the frozen base in this process, one model on all its cores;
    ``"ray"`` in a Ray Data pool of ``concurrency`` actors, which spreads a large cache over a
    cluster's nodes but costs each actor a fresh TensorFlow process (~5-10 s on a small machine);
    ``"auto"``: here on a single node without GPUs (a laptop, CI), Ray elsewhere. ``precision``
    (auto, float32, bfloat16; :mod:`xray_dist.model.precision`) is resolved here, on the driver,
    and names the directory: bfloat16 and float32 features never mix."""
    if boundary_layer(unfreeze_blocks) is None:
        return None
    precision = concrete(precision)
    key = features_key(cache, weights, seed, unfreeze_blocks, precision)
    job = Extraction(str(cache), CacheLayout(str(cache)).features(key), weights, seed, unfreeze_blocks, where,
                     concurrency, precision)
    if storage.is_file(job.meta_path):
        return job.out
    with TargetLock(job.out, "frozen-feature extraction"):  # two sweeps on one cache: one extracts
        if storage.is_file(job.meta_path):  # the other finished it while this one waited for nothing
            return job.out
        _extract(job, key)
    return job.out


def _extract(job: Extraction, key: str) -> None:
    storage.delete_dir(job.shards)  # an interrupted extraction (nothing when absent)
    where = job.where
    if where == "auto":
        where, why = extraction_place()
        log.debug("frozen features: extracting %s (%s)", "in this process" if where == "here" else "on the cluster", why)
    if where not in ("here", "ray"):
        raise ValueError(f"where={where!r}: expected 'auto', 'here' or 'ray'")
    log.info("computing frozen features at %s for depth %d in %s (once per cache, weights, depth and precision; "
             "%s)", job.layer, job.unfreeze_blocks, job.precision, "in this process" if where == "here" else f"{job.concurrency} Ray Data actors")
    shape = _extract_here(job) if where == "here" else _extract_with_ray(job)
    storage.write_json(job.meta_path, {"layer": job.layer, "shape": shape, "unfreeze_blocks": job.unfreeze_blocks,
                                       "weights": job.weights, "seed": job.seed, "precision": job.precision,
                                       "key": key})  # written last: complete


def extraction_place() -> tuple[str, str]:
    """Where :func:`ensure_features` runs the frozen base, and why.

    In this process only on a single node without GPUs whose own CPUs are there to use (a laptop,
    CI). A node with no CPUs for work — the usual head of an autoscaling cluster, started with
    ``--num-cpus 0`` — extracts on the cluster (Ray Data asks for the resources, the autoscaler
    starts workers for them), whatever is up at the moment.
    """
    import ray  # Ray: heavy

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


def _extract_here(job: Extraction) -> list:
    """The frozen base in this process over the cache's readable rows, 256 rows per Parquet shard
    (Ray Data's tensor column type, so readers cannot tell the two ways apart)."""
    import tf_keras as keras  # TensorFlow: in the extracting process only
    from ray.data.block import BlockAccessor

    from xray_dist.model.network import frozen_part, scorer  # imports TensorFlow

    size = load_spec(job.cache).image_size
    keras.utils.set_random_seed(job.seed)  # weights="none": the same random base as the uncached model
    with keras_policy(job.precision):
        model = frozen_part(size, job.weights, job.unfreeze_blocks)
    run = scorer(model)
    storage.makedirs(job.shards)
    dset = images_dataset(job.cache)
    ok = pc.field("error").is_null() | (pc.field("error") == "")
    with Progress(dset.count_rows(filter=ok), f"frozen features (depth {job.unfreeze_blocks}, {job.precision})",
                  unit="image") as bar:
        for i, rb in enumerate(dset.to_batches(columns=["path", "image"], filter=ok, batch_size=256)):
            if rb.num_rows == 0:
                continue
            images = tensor_column_to_numpy(rb.column("image"), size)
            x = []
            for j in range(0, len(images), 32):
                x.append(run(images[j : j + 32]).astype(np.float32))
                bar.update(len(x[-1]))
            block = BlockAccessor.batch_to_block({"path": np.asarray(rb.column("path").to_pylist(), dtype=object),
                                                  "x": np.concatenate(x)})
            storage.write_parquet(block, storage.join(job.shards, f"part-{i:05d}.parquet"))
    shape = list(model.output_shape[1:])
    del model
    keras.backend.clear_session()
    return shape


def _extract_with_ray(job: Extraction) -> list:
    from xray_dist.model.network import frozen_part  # imports TensorFlow

    size = load_spec(job.cache).image_size
    ds = read_cache_parquet(CacheLayout(job.cache).images, ["path", "image", "error"], 0.25)
    ds = ds.filter(lambda r: not r["error"]).select_columns(["path", "image"])
    ds = ds.map_batches(_Extractor, fn_constructor_kwargs={"image_size": size, "weights": job.weights,
                                                           "seed": job.seed, "unfreeze_blocks": job.unfreeze_blocks,
                                                           "precision": job.precision},
                        batch_size=32, batch_format="numpy", concurrency=job.concurrency, num_cpus=0.5)
    path, fs = storage.ray_storage(job.shards)
    ds.write_parquet(path, filesystem=fs)
    return list(frozen_part(size, "none", job.unfreeze_blocks).output_shape[1:])


def read_meta(features: str | Path) -> dict:
    return storage.read_json(storage.join(features, "meta.json"))
