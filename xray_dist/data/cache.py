"""The prepared cache: its layout and every reader.

The one module that knows where a cache keeps what (:class:`CacheLayout` joins every path into
it); every later stage asks it (``evaluate``, ``train``, sweeps, the benchmark), none joins paths
into a cache itself. ``prepare`` (:mod:`xray_dist.data.prepare`) writes it.

Layout (``CACHE/``)::

    images/*.parquet        one row per input file: path (relative to the data directory, or a
                            salted key with --redact-paths: :mod:`xray_dist.data.paths`), patient
                            (salted key, :mod:`xray_dist.data.patients`) and what made it, the
                            header's subgroup attributes (sex, age band, view, manufacturer,
                            model, site key), image (uint8 S×S tensor), error_kind, error — one file per decode task,
                            never rewritten unless the inputs or the spec change
    images/_WRITTEN.json    the chunk files prepare is writing, recorded before any is written: the
                            only files a later prepare ever deletes
    images/_COMPLETE.json   the key the images were made with and their chunk files (the only
                            files readers read); written last, so a crashed prepare is never
                            mistaken for a finished one
    manifest.parquet        one row per image used: path, split, label, patient, and its subgroup
                            attributes (the labels' over the header's; ``unknown`` where neither)
    preprocess.json         the :class:`~xray_dist.config.PreprocessSpec`
    prepare_report.json     found / ok / quarantined / missing / unlabeled / classes / splits
    fingerprint.json        what runs pin (:mod:`xray_dist.data.fingerprint`; recomputed from the
                            manifest when read)
    features/<key>/         frozen-backbone activations a sweep computed from these images
                            (written by :mod:`xray_dist.training.features`, not by prepare)

The cache holds no salt (:mod:`xray_dist.data.salt` keeps it apart); caches made before salts left
them hold ``.salt``, which that module reads (never writes).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from xray_dist.config import PreprocessSpec
from xray_dist.data.classes import ClassScheme
from xray_dist.errors import CacheError
from xray_dist.infra import storage

# ---- layout ----------------------------------------------------------------------------------------

#: The decoded images' folder, its journal and its completion marker (see the module's docstring).
IMAGES_DIR, WRITTEN, COMPLETE = "images", "_WRITTEN.json", "_COMPLETE.json"
#: In the images directory: the chunks holding instances an archive did not hand over (decoded
#: again by the next prepare, whatever else is kept).
RETRY = "_RETRY.json"
#: The files beside it.
MANIFEST, SPEC, REPORT, FINGERPRINT = "manifest.parquet", "preprocess.json", "prepare_report.json", "fingerprint.json"
#: The sweeps' frozen-activation caches (one folder per key; :mod:`xray_dist.training.features`).
FEATURES_DIR = "features"
#: The salt file of caches made before salts left them (read by :mod:`xray_dist.data.salt`, never written).
LEGACY_SALT = ".salt"
#: Files (relative to the cache) that only a cache holds: a folder with none of them is not one.
OWN_FILES = frozenset({SPEC, f"{IMAGES_DIR}/{COMPLETE}", f"{IMAGES_DIR}/{WRITTEN}"})
#: The columns of an image row besides the pixels.
META_COLUMNS = ["path", "patient", "error_kind", "error"]
#: The subgroup attributes of each decoded row and of the manifest (:mod:`xray_dist.data.subgroups`).
ATTRIBUTE_COLUMNS = ("sex", "age", "view", "manufacturer", "model", "site")
#: The chunk names of caches written before prepare recorded its writes (used only for those).
_LEGACY_CHUNK = re.compile(r"chunk-[0-9a-f]{20}\.parquet")


@dataclass(frozen=True)
class CacheLayout:
    """Where the cache at ``root`` (a local path or URI) keeps each file: the one place that joins
    paths into a cache."""

    root: str

    @property
    def images(self) -> str:
        return storage.join(self.root, IMAGES_DIR)

    @property
    def complete(self) -> str:
        return storage.join(self.root, IMAGES_DIR, COMPLETE)

    @property
    def written(self) -> str:
        return storage.join(self.root, IMAGES_DIR, WRITTEN)

    def chunk(self, name: str) -> str:
        """The decoded-images file ``name`` (a name :func:`recorded_chunks` or prepare gives)."""
        return storage.join(self.root, IMAGES_DIR, name)

    @property
    def manifest(self) -> str:
        return storage.join(self.root, MANIFEST)

    @property
    def spec(self) -> str:
        return storage.join(self.root, SPEC)

    @property
    def report(self) -> str:
        return storage.join(self.root, REPORT)

    @property
    def fingerprint(self) -> str:
        return storage.join(self.root, FINGERPRINT)

    def features(self, key: str) -> str:
        """The frozen-activation cache of ``key`` (:mod:`xray_dist.training.features` writes it)."""
        return storage.join(self.root, FEATURES_DIR, key)

    @property
    def legacy_salt(self) -> str:
        return storage.join(self.root, LEGACY_SALT)


# ---- readers ---------------------------------------------------------------------------------------

def read_marker(marker: str) -> dict | None:
    """A JSON record (completion marker, journal), or None when there is none."""
    try:
        return storage.read_json(marker)
    except FileNotFoundError:
        return None


def recorded_chunks(images_dir: str) -> list[str]:
    """The chunk files an earlier prepare recorded writing into ``images_dir`` (its journal, and
    its completion marker's list); for a cache from before the journal, its marker's chunks by
    their exact name pattern."""
    out: set[str] = set()
    for name in (WRITTEN, COMPLETE):
        rec = read_marker(storage.join(images_dir, name)) or {}
        out.update(rec.get("chunks", []))
    if not out and read_marker(storage.join(images_dir, COMPLETE)) is not None:
        out = {f.rel for f in storage.list_files(images_dir) if _LEGACY_CHUNK.fullmatch(f.rel)}
    return sorted(out)


def data_files(directory: str | Path) -> list[str]:
    """The Parquet files a reader reads in ``directory`` (the decoded images, or another folder of
    Parquet chunks with a completion marker): those its completion marker lists, else every
    top-level ``*.parquet`` that is not hidden (a ``.writing_*`` left by a crash is not data)."""
    rec = read_marker(storage.join(directory, COMPLETE))
    if rec and rec.get("chunks"):
        return list(rec["chunks"])
    return [e.rel for e in storage.list_files(directory)
            if e.rel.endswith(".parquet") and "/" not in e.rel and not e.rel.startswith(".")]


def images_key(cache: str | Path) -> str:
    """The key the decoded images were made with (their completion marker's): the data location,
    every file's path, size and modification time, the spec, the salt."""
    rec = read_marker(CacheLayout(str(cache)).complete)
    if rec is None:
        raise CacheError(f"{cache} is not a complete prepared cache (no {IMAGES_DIR}/{COMPLETE}); run `xray-dist "
                         "prepare` first")
    return rec["key"]


def read_image_meta(cache: str | Path) -> pa.Table:
    """Path, patient (and what made its key), subgroup attributes and error of every decoded input
    (no pixels read)."""
    dset = images_dataset(cache)
    return dset.to_table(columns=[c for c in [*META_COLUMNS, "patient_source", *ATTRIBUTE_COLUMNS]
                                  if c in dset.schema.names])


def parquet_dataset(directory: str | Path):
    """A :mod:`pyarrow.dataset` over the Parquet files of ``directory`` (local or URI; the
    completion marker and other non-Parquet files are not part of it)."""
    fs, inner = storage.filesystem(directory)
    files = [f"{inner}/{rel}" for rel in data_files(directory)]
    if not files:
        raise CacheError(f"{directory}: no Parquet files")
    return pads.dataset(files, format="parquet", filesystem=fs)


def images_dataset(cache: str | Path):
    """A :mod:`pyarrow.dataset` over the decoded images (every row, pixels included, read lazily)."""
    return parquet_dataset(CacheLayout(str(cache)).images)


def load_spec(cache: str | Path) -> PreprocessSpec:
    """The :class:`~xray_dist.config.PreprocessSpec` the images were decoded with."""
    try:
        return PreprocessSpec.from_dict(storage.read_json(CacheLayout(str(cache)).spec))
    except FileNotFoundError:
        raise CacheError(f"{cache} is not a prepared cache (no {SPEC}); run `xray-dist prepare` first") from None


def load_manifest(cache: str | Path) -> pa.Table:
    """The manifest (path, split, label, patient of every image used) of a complete cache."""
    layout = CacheLayout(str(cache))
    if not storage.is_file(layout.manifest) or not storage.is_file(layout.complete):
        raise CacheError(f"{cache} is not a complete prepared cache (no {MANIFEST}); run `xray-dist prepare` first")
    return pq.read_table(storage.open_input(layout.manifest))


def read_cache_parquet(directory: str | Path, columns: list[str], num_cpus: float):
    """A Ray Dataset over the Parquet files in ``directory`` whose every task asks for ``num_cpus``.

    Ray Data's own ``read_parquet`` schedules helper tasks that each ask for a whole CPU whatever
    ``num_cpus`` says — V2's ``ListFiles`` operator, V1's file-sampling tasks — so on a small node
    whose Train workers already hold part of the CPUs, ingestion waits forever (seen on 2-CPU
    machines in sweeps). The cache's files and row counts are known locally (Parquet footers), so a
    minimal datasource does without them: read tasks over consecutive files (:func:`read_groups`),
    one block per file, nothing else.
    """
    import ray  # Ray: read where a Ray Dataset is wanted (training, sweeps), never by the CLI's import

    return ray.data.read_datasource(_CacheParquetSource(directory, columns), num_cpus=num_cpus)


#: The least a read task of :func:`read_cache_parquet` is given to read, when the cache has more files.
TASK_BYTES = 32 * 2**20


def read_groups(sizes: list[int], parallelism: int) -> list[list[int]]:
    """The cache's files (their sizes, in order) in consecutive groups, one read task each: at most
    ``parallelism`` groups, and no more than one per :data:`TASK_BYTES`. A small cache is read by one
    task, not one per file: each task may be a new worker process, which is most of what reading a
    few megabytes costs."""
    n = max(1, min(len(sizes), parallelism, -(-sum(sizes) // TASK_BYTES)))
    bounds = np.linspace(0, len(sizes), n + 1).round().astype(int)
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _cache_parquet_source_class():
    """The datasource of :func:`read_cache_parquet` (a subclass of Ray's, so built once Ray is imported)."""
    from ray.data.block import BlockMetadata  # Ray: see read_cache_parquet
    from ray.data.datasource import Datasource, ReadTask

    class CacheParquetSource(Datasource):
        def __init__(self, directory: str | Path, columns: list[str]):
            super().__init__()
            self.directory = str(directory)  # local path or URI: each read task opens it itself
            self.files = data_files(directory)
            if not self.files:
                raise CacheError(f"{directory}: no Parquet files")
            self.columns = list(columns)
            fs, inner = storage.filesystem(directory)
            self.meta = [pq.ParquetFile(f"{inner}/{f}", filesystem=fs).metadata for f in self.files]

        def estimate_inmemory_data_size(self) -> int:
            return int(sum(m.serialized_size + sum(m.row_group(i).total_byte_size for i in range(m.num_row_groups))
                           for m in self.meta))

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
            sizes = [sum(m.row_group(i).total_byte_size for i in range(m.num_row_groups)) for m in self.meta]
            tasks = []
            for group in read_groups(sizes, parallelism):
                files = [self.files[i] for i in group]

                def read(paths=[storage.join(self.directory, f) for f in files], columns=self.columns):
                    for path in paths:  # one block per file
                        fs, inner = storage.filesystem(path)  # built in the task's process, from its environment
                        yield pq.read_table(inner, columns=columns, filesystem=fs)

                meta = BlockMetadata(num_rows=sum(self.meta[i].num_rows for i in group),
                                     size_bytes=sum(sizes[i] for i in group), exec_stats=None, input_files=tuple(files))
                tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
            return tasks

    return CacheParquetSource


def _CacheParquetSource(directory, columns):  # noqa: N802 - the class needs Ray imported, so it is built lazily
    return _cache_parquet_source_class()(directory, columns)


def load_split_arrays(cache: str | Path, split: str | None) -> tuple[list[str], np.ndarray]:
    """Paths and images of one split (None: every image), in manifest order, read with pyarrow
    (for driver-side work)."""
    manifest = load_manifest(cache)
    paths = [p for p, s in zip(manifest.column("path").to_pylist(), manifest.column("split").to_pylist())
             if split is None or s == split]
    dset = images_dataset(cache)
    table = dset.to_table(columns=["path", "image"], filter=pc.field("path").isin(paths))
    spec = load_spec(cache)
    index = {p: i for i, p in enumerate(table.column("path").to_pylist())}
    flat = table.column("image").combine_chunks()
    images = tensor_column_to_numpy(flat, spec.image_size)
    order = [index[p] for p in paths]
    return paths, images[order]


def tensor_column_to_numpy(col: pa.Array, size: int) -> np.ndarray:
    """A Ray tensor-extension (or plain binary/list) column → ``(n, size, size)`` uint8."""
    raw = col.storage if isinstance(col, pa.ExtensionArray) else col
    if pa.types.is_binary(raw.type) or pa.types.is_large_binary(raw.type):
        return np.stack([np.frombuffer(b.as_py(), dtype=np.uint8) for b in raw]).reshape(-1, size, size)
    values = raw.flatten()
    while not pa.types.is_integer(values.type):
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False).astype(np.uint8).reshape(-1, size, size)


def read_report(cache: str | Path) -> dict:
    """The prepare report, whole (``{}`` when the cache has none)."""
    try:
        return storage.read_json(CacheLayout(str(cache)).report)
    except FileNotFoundError:
        return {}


def read_report_summary(cache: str | Path) -> dict:
    """Counts from the prepare report (no paths), for run metrics and reports."""
    r = read_report(cache)
    if not r:
        return {}
    return {"found": r["found"], "ok": r["ok"], "quarantined": len(r["quarantined"]),
            "excluded": len(r.get("excluded", [])), "task": r.get("task", "multiclass"), "classes": r["classes"],
            "splits": r["splits"], "image_size": r["image_size"], "subgroups": r.get("subgroups", {}),
            **({"split_fingerprint": r["split_fingerprint"], "split_settings": r.get("split_settings", {})}
               if r.get("split_fingerprint") else {})}


def manifest_labels(cache: str | Path, split: str | None = None) -> list[tuple[str, str]]:
    """``(path, label)`` of the manifest's images (of one split, or all)."""
    m = load_manifest(cache)
    return [(p, lab) for p, s, lab in zip(m.column("path").to_pylist(), m.column("split").to_pylist(),
                                          m.column("label").to_pylist()) if split is None or s == split]


def split_labels(cache: str | Path, split: str | None, scheme: ClassScheme) -> dict:
    """Path → training target (:meth:`ClassScheme.target`) of every image in ``split`` (None:
    every image, an external cache's; a :class:`CacheError` when there is none)."""
    rows = manifest_labels(cache, split)
    unseen = Counter(lab for _, lab in rows if not scheme.knows(lab))
    if unseen:
        lab, n = unseen.most_common(1)[0]
        if split is None:
            raise CacheError(f"{cache}: class {lab!r} ({n} images) is not one of the model's classes "
                             f"({', '.join(scheme.names)}); leave it out of the external cache's labels")
        raise CacheError(f"{cache}: class {lab!r} has {n} images in the {split!r} split but none in 'train', so the "
                         "model has no output for it; prepare again with another --seed or fractions, or leave the "
                         "class out of the labels")
    label_of = {p: scheme.target(lab) for p, lab in rows}
    if not label_of:
        raise CacheError(f"{cache}: the {split!r} split is empty; prepare with more patients or another fraction")
    return label_of
