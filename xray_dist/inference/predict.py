"""``predict``: DICOM files → class probabilities with a trained run's exported model.

The run's ``model/model_spec.json`` carries the architecture, the class scheme and the
preprocessing spec, so files are read exactly as the cache was made. A file that cannot be read
gets a row with its error; the others go on.

Two engines write the same CSV (one row per input file, in input order):

- ``local``: this process reads and scores every file (a handful of files, a laptop);
- ``ray``: Ray Data batch inference — files are decoded in CPU tasks, the model runs in a pool of
  actors (one GPU each where the cluster has GPUs, else a share of the CPUs with as many
  TensorFlow threads), so a bucket prefix or a large directory is spread over the cluster.
  ``auto`` (the default) takes it for object-store inputs and for 256 files or more.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np

from xray_dist.config import PreprocessSpec
from xray_dist.data import dicomweb
from xray_dist.data.classes import ClassScheme, join_findings
from xray_dist.data.dicom import load_image
from xray_dist.data.paths import REDACT, RELATIVE, PathNames, named_inputs, write_path_map
from xray_dist.data.salt import resolve as resolve_salt
from xray_dist.errors import DicomReadError
from xray_dist.infra import storage
from xray_dist.infra.console import Progress
from xray_dist.infra.runtime import init_ray
from xray_dist.model.artifacts import (load_run_model, model_dir_of, predict_arrays, read_spec, ready_scorer,
                                      run_preprocess, spec_thresholds)

log = logging.getLogger(__name__)


_NOT_IMAGES = {".csv", ".json", ".txt", ".png", ".npy", ".html", ".md", ".yaml", ".yml"}


def expand_inputs(inputs: list[str]) -> tuple[list[str], list[str]]:
    """``(files, rels)``: files as given, directories and object-store prefixes as their files
    (recursively, sorted, hidden ones and known non-image files skipped); each file's path relative
    to the input it came from — its file name when given by itself — which outputs name it by
    (:mod:`xray_dist.data.paths`)."""

    def files_of(item: str) -> list[str] | None:
        storage.check_location(item)
        if not storage.is_dir(item):
            return None
        return [e.rel for e in storage.list_files(item) if not any(s.startswith(".") for s in e.rel.split("/"))
                and PurePosixPath(e.rel).suffix.lower() not in _NOT_IMAGES]

    files, rels = [], []
    for item in inputs:  # a DICOMweb query: its instances (QIDO-RS), each read with WADO-RS
        if dicomweb.is_source(item):
            found = [e.rel for e in dicomweb.list_instances(dicomweb.Source.parse(item),
                                                            dicomweb.Credentials.from_env())]
            files += [dicomweb.location(item, r) for r in found]
            rels += found
        else:
            more = named_inputs([item if storage.is_uri(item) else str(Path(item))], files_of)
            files += more[0]
            rels += more[1]
    return files, rels


def prediction_columns(scheme: ClassScheme) -> list[str]:
    return ["prediction", *[f"p_{k}" for k in scheme.keys], "abnormal_score", "abnormal_at_threshold"]


def prediction_row(scheme: ClassScheme, p: np.ndarray, threshold: float, thresholds: dict[str, float]) -> dict:
    """One image's columns: the prediction (the argmax class; multi-label: the findings at or above
    their thresholds, joined by ``|``, or the negative class), each output's probability, the
    abnormal score (:meth:`ClassScheme.abnormal_score`) and whether it reaches the model's threshold."""
    if scheme.multilabel:
        found = [n for n, k, v in zip(scheme.names, scheme.keys, p) if v >= thresholds.get(k, 0.5)]
        prediction = join_findings(found, negative=scheme.negative)  # as the labels write it: sorted
    else:
        prediction = scheme.names[int(np.argmax(p))]
    abnormal = float(scheme.abnormal_score(p[None, :])[0])
    return {"prediction": prediction, **{f"p_{k}": float(v) for k, v in zip(scheme.keys, p)},
            "abnormal_score": abnormal, "abnormal_at_threshold": bool(abnormal >= threshold)}


def decode_threads(files: list[str]) -> int:
    """Files decoded at once by the local engine: every CPU (pydicom's codecs, numpy and Pillow's
    resize release the GIL for the heavy part), at most ``--dicomweb-connections``' default for an
    archive, so a laptop's predict cannot flood a clinical server either."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if any(dicomweb.is_source(f) for f in files):
        n = min(n, dicomweb.CONNECTIONS)
    return max(1, min(n, len(files)))


class decoded_batches:  # noqa: N801 - used as the generator it was
    """Every file read as the model sees it, ``batch_size`` files at a time, in input order: per
    chunk ``(start, errors, good)``: each file's error (``kind: reason``, empty when read; the file
    named as ``names`` names it) and the ``(index, image)`` of each readable one. ``threads`` files
    are decoded at once, from the moment this is made (so a model can load meanwhile), and the next
    three chunks are decoding while the caller uses this one (the model runs in TensorFlow's
    threads meanwhile); only those chunks are held, whatever the number of files. A bad file is
    logged (one line) and the rest go on, whatever the failure. Iterate it once, or ``close()`` it
    (a ``with`` block does) to cancel what is left."""

    def __init__(self, files: list[str], rels: list[str], spec: PreprocessSpec, what: str, batch_size: int,
                 names: PathNames = PathNames(), threads: int | None = None):
        self.files, self.rels, self.spec, self.what, self.names = files, rels, spec, what, names
        self.starts = list(range(0, len(files), batch_size))
        self.size = batch_size
        self.pool, self.closed = ThreadPoolExecutor(threads or decode_threads(files)), False
        self.ahead: deque = deque(self._submit(start) for start in self.starts[:3])

    def _read(self, i: int):
        try:
            return load_image(self.files[i], self.spec), ""
        except Exception as e:  # noqa: BLE001 - DicomReadError, or anything else: a row with its reason
            return None, self.names.scrub(file_error(e), self.files[i], self.rels[i])

    def _submit(self, start: int) -> list:
        return [self.pool.submit(self._read, i) for i in range(start, min(start + self.size, len(self.files)))]

    def __iter__(self) -> Iterator[tuple[int, list[str], list[tuple[int, np.ndarray]]]]:
        if self.closed:
            raise RuntimeError("decoded_batches: iterated once already, or closed")
        try:
            with Progress(len(self.files), f"{self.what}: read") as bar:
                for k, start in enumerate(self.starts):
                    errors, good = [], []
                    for j, fut in enumerate(self.ahead.popleft()):
                        img, err = fut.result()
                        errors.append(err)
                        if err:
                            log.warning("%s: %s: %s", self.what, self.names.name(self.rels[start + j]), err)
                        else:
                            good.append((start + j, img))
                        bar.update()
                    if k + 3 < len(self.starts):
                        self.ahead.append(self._submit(self.starts[k + 3]))
                    yield start, errors, good
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the reads not started; those running finish in their threads (an archive's
        request is not waited for)."""
        self.closed = True
        self.pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "decoded_batches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_inputs(files: list[str], rels: list[str], spec: PreprocessSpec, what: str,
                names: PathNames = PathNames()) -> tuple[list[str], list[tuple[int, np.ndarray]]]:
    """Every file at once (:func:`decoded_batches`): each file's error and the ``(index, image)``
    of each readable one."""
    errors: list[str] = []
    good: list[tuple[int, np.ndarray]] = []
    for _, errs, ok in decoded_batches(files, rels, spec, what, 64, names):
        errors += errs
        good += ok
    return errors, good


def file_error(e: BaseException) -> str:
    """One file's failure as its CSV cell: ``kind: reason``."""
    if isinstance(e, DicomReadError):
        return f"{e.kind}: {e.reason}"
    return f"unexpected: {type(e).__name__}: {e}"


#: ``--engine auto`` uses Ray Data from this many files on (and for any object-store input).
RAY_MIN_FILES = 256


def predict_files(run: str | Path, inputs: list[str], out_csv: str | Path, *, batch_size: int = 32,
                  engine: str = "auto", address: str | None = None, num_cpus: int | None = None,
                  names: PathNames = PathNames(), path_map: str | None = None, precision: str = "auto",
                  uid_names: bool = False) -> list[dict]:
    """Write ``out_csv`` (path, prediction, p_<class>..., abnormal score, error) and return its rows.
    ``path`` names each file as ``names`` says (relative to its input, or a salted key; a DICOMweb
    query's instances by salted keys unless ``uid_names``: STUDY/SERIES/SOP.dcm); the model
    computes in ``precision`` (:mod:`xray_dist.model.precision`; auto: bfloat16 on a CPU with it)."""
    if engine not in ("auto", "local", "ray"):
        raise ValueError(f"engine must be auto, local or ray. Received: engine={engine!r}")
    storage.check_location(out_csv)
    files, rels = expand_inputs(inputs)
    archive = any(dicomweb.is_source(f) for f in files)
    if archive and names.policy == RELATIVE and not uid_names:  # UIDs can identify a study: keys, as prepare's
        names = PathNames(REDACT, resolve_salt(None))
    if path_map:
        write_path_map(path_map, files, rels, names)
    if engine == "auto":
        engine = "local" if archive else (
            "ray" if len(files) >= RAY_MIN_FILES or any(storage.is_uri(f) for f in files) else "local")
    if engine == "ray":
        scheme, spec, errors, probs = _predict_with_ray(run, files, rels, names, batch_size, address, num_cpus,
                                                        precision)
    else:
        # the files start decoding first (the run's preprocessing is in its spec), while the model
        # loads and its forward pass is compiled; then it scores each chunk while the next ones decode
        with decoded_batches(files, rels, run_preprocess(run), "predict", batch_size, names) as chunks:
            lm = load_run_model(run, precision)
            ready_scorer(lm.model)
            scheme, spec = lm.scheme, lm.spec
            errors, probs = [], np.full((len(files), scheme.num_classes), np.nan)
            for _, errs, good in chunks:
                errors += errs
                if good:
                    probs[[i for i, _ in good]] = predict_arrays(lm, np.stack([img for _, img in good]), batch_size)
    threshold, thresholds = spec_thresholds(spec)
    rows = [{"path": names.name(rel), "prediction": "", "error": err} for rel, err in zip(rels, errors)]
    for i, row in enumerate(rows):
        if not row["error"]:
            row.update(prediction_row(scheme, probs[i], threshold, thresholds))
    storage.write_csv(out_csv, rows, ["path", *prediction_columns(scheme), "error"])  # whole or absent
    return rows


# ---- Ray Data batch inference ------------------------------------------------------------------------

def _decode_rows(batch: dict, spec_dict: dict, names: PathNames = PathNames(),
                 creds: dicomweb.Credentials | None = None) -> dict:
    """CPU task: each file read as the model sees it (zeros and the reason for an unreadable one).
    ``creds``: the driver's DICOMweb credentials, for an archive's instances (the task's own
    environment has none; they travel as the task's argument, never in an environment or a log)."""
    spec = PreprocessSpec.from_dict(spec_dict)
    n = len(batch["path"])
    images = np.zeros((n, spec.image_size, spec.image_size), dtype=np.uint8)
    errors = []
    for i, (path, rel) in enumerate(zip(batch["path"], batch["rel"])):
        try:
            images[i] = load_image(str(path), spec, creds)
            errors.append("")
        except Exception as e:  # noqa: BLE001 - whatever failed, this file's row says so and the rest go on
            errors.append(names.scrub(file_error(e), str(path), str(rel)))
    return {"index": np.asarray(batch["index"]), "image": images, "error": np.asarray(errors, dtype=object)}


class _Scorer:
    """Ray Data actor: the run's model, loaded once per actor (from local disk or the object store)."""

    def __init__(self, run: str, threads: int, precision: str = "auto"):
        import tensorflow as tf  # TensorFlow: in the model actors only

        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        for g in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(g, True)
        self.lm = load_run_model(run, precision)  # auto: each actor by its own node's CPU or GPU

    def __call__(self, batch: dict) -> dict:
        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        probs = np.full((len(ok), self.lm.scheme.num_classes), np.nan)
        if ok.any():
            probs[ok] = predict_arrays(self.lm, np.asarray(batch["image"])[ok])
        return {"index": np.asarray(batch["index"]), "probs": probs, "error": batch["error"]}


def _predict_with_ray(run: str | Path, files: list[str], rels: list[str], names: PathNames, batch_size: int,
                      address: str | None, num_cpus: int | None,
                      precision: str = "auto") -> tuple[ClassScheme, dict, list[str], np.ndarray]:
    import ray as _ray  # Ray: only for the ray engine

    run = storage.absolute(run)
    spec = read_spec(model_dir_of(run))
    scheme = ClassScheme.from_dict(spec["classes"])
    init_ray(address, num_cpus)
    res = _ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
    if gpus:
        pool = {"num_gpus": 1, "num_cpus": 1, "concurrency": (1, gpus)}
        threads = 0
    else:
        # a half CPU per actor and per decode task: with C CPUs, C actors and C decode tasks run at
        # once, the actor's TensorFlow on one thread
        pool = {"num_cpus": 0.5, "concurrency": (1, cpus)}  # grows with the input, up to one per CPU
        threads = 1
    log.info("predict: Ray Data batch inference over %d files (up to %d model actors%s)", len(files),
             pool["concurrency"][1],
             ", one GPU each" if gpus else "")
    ds = _ray.data.from_items([{"index": i, "path": f, "rel": r} for i, (f, r) in enumerate(zip(files, rels))],
                              override_num_blocks=max(1, min(len(files), cpus * 4)))
    ds.context.enable_progress_bars = False
    # Decoding stays in its own CPU tasks, apart from the model actors: Ray Data fuses a task map
    # into the next actor map when their remote arguments are equal, which would decode inside the
    # (GPU) actors. max_retries differs from the actors' arguments, so the two never fuse, and a
    # decode task lost with its node (an autoscaling cluster scaling down) is retried.
    archive = any(dicomweb.is_source(f) for f in files)
    # an archive's instances: the driver's credentials as the tasks' argument, and at most
    # dicomweb.CONNECTIONS decode tasks retrieving at once (a clinical server is not flooded)
    ds = ds.map_batches(_decode_rows, fn_kwargs={"spec_dict": spec["preprocess"], "names": names,
                                                 "creds": dicomweb.Credentials.from_env() if archive else None},
                        batch_size=16, batch_format="numpy", num_cpus=0.5, max_retries=3,
                        **({"concurrency": dicomweb.CONNECTIONS} if archive else {}))
    ds = ds.map_batches(_Scorer, fn_constructor_kwargs={"run": run, "threads": threads, "precision": precision}, batch_size=batch_size,
                        batch_format="numpy", **pool)
    errors = [""] * len(files)
    probs = np.full((len(files), scheme.num_classes), np.nan)
    with Progress(len(files), "predict") as bar:
        for b in ds.iter_batches(batch_size=256, batch_format="numpy"):
            for i, p, e in zip(b["index"], b["probs"], b["error"]):
                probs[int(i)] = p
                errors[int(i)] = str(e)
                if e:
                    log.warning("predict: %s: %s", names.name(rels[int(i)]), e)
            bar.update(len(b["index"]))
    log.debug("predict: Ray Data plan and stats:\n%s", ds.stats())
    return scheme, spec, errors, probs
