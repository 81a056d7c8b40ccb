"""``prepare`` on real Ray: every file accounted for, no patient leaks, nothing identifying written,
the cache reused only when inputs and settings match."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.data import get_testdata_file

from xray_dist.cli import app as cli
from xray_dist.data.cache import load_manifest, load_split_arrays

pytestmark = pytest.mark.slow

REAL = {  # shipped radiographs / syntaxes -> label
    "RG1_J2KR.dcm": "finding", "RG1_J2KI.dcm": "finding", "RG3_UNCR.dcm": "normal", "RG3_J2KR.dcm": "normal",
    "JPEG-LL.dcm": "normal", "JPGExtended.dcm": "finding", "SC_rgb_jpeg_dcmtk.dcm": "normal",
    "MR_small_jpeg_ls_lossless.dcm": "finding", "JPEGLSNearLossless_16.dcm": "normal",
}
CORRUPT = {  # name -> expected error kind
    "garbage.dcm": "not_dicom", "empty.dcm": "not_dicom", "truncated.dcm": "truncated",
    "report.dcm": "no_pixel_data", "multiframe.dcm": "unsupported_image",
}


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory, synth_binary):
    """Synthetic radiographs in every encoding + shipped real files + a corrupt corpus + bad label rows."""
    root = tmp_path_factory.mktemp("mixed")
    data = root / "data"
    shutil.copytree(synth_binary.out, data)
    rows = [[rel, lab] for rel, lab in synth_binary.labels.items()]
    (data / "real").mkdir()
    for name, lab in REAL.items():
        shutil.copy(get_testdata_file(name), data / "real" / name)
        rows.append([f"real/{name}", lab])
    bad = data / "bad"
    bad.mkdir()
    (bad / "garbage.dcm").write_bytes(b"\x00" * 50 + b"not dicom at all")
    (bad / "empty.dcm").write_bytes(b"")
    good = next(f for f in synth_binary.files if "mono2_u16_explicit" in f.name).read_bytes()
    (bad / "truncated.dcm").write_bytes(good[: len(good) // 2])
    shutil.copy(get_testdata_file("reportsi.dcm"), bad / "report.dcm")
    shutil.copy(get_testdata_file("emri_small.dcm"), bad / "multiframe.dcm")
    rows += [[f"bad/{n}", "normal"] for n in CORRUPT]
    rows += [["does/not/exist.dcm", "normal"], ["../../etc/passwd", "finding"]]
    (data / "unlabeled_extra.dcm").write_bytes(good)
    labels = root / "labels.csv"
    with labels.open("w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], *rows])
    return data, labels, len(rows) - 2


def run_prepare(data, labels, out, *extra) -> int:
    return cli.main(["prepare", str(data), "--labels", str(labels), "--out", str(out), "--image-size", "32", *extra])


def test_mixed_directory_every_file_accounted_for(ray_cluster, mixed_dir, tmp_path, capsys):
    data, labels, n_labelled = mixed_dir
    assert run_prepare(data, labels, tmp_path / "cache") == 0
    report = json.loads((tmp_path / "cache" / "prepare_report.json").read_text())
    assert report["found"] == n_labelled == report["ok"] + len(report["quarantined"])
    kinds = {Path(q["path"]).name: q["reason"].split(":")[0] for q in report["quarantined"]}
    assert kinds == CORRUPT
    assert all(Path(q["path"]).name in CORRUPT and "bad/" in q["path"] for q in report["quarantined"])
    missing = {m["path"]: m["reason"] for m in report["missing"]}
    assert missing["does/not/exist.dcm"] == "file not found" and "escapes" in missing["../../etc/passwd"]
    assert report["unlabeled"] == ["unlabeled_extra.dcm"]
    manifest = load_manifest(tmp_path / "cache")
    assert set(manifest.column_names) >= {"path", "split", "label", "patient"}
    assert manifest.num_rows == report["ok"]
    used = set(manifest.column("path").to_pylist())
    assert {f"real/{n}" for n in REAL} <= used
    assert sum(v["images"] for v in report["splits"].values()) == report["ok"]
    out = capsys.readouterr().out
    assert "quarantined bad/garbage.dcm" in out


def test_no_patient_in_two_splits_and_classes_in_val(prepared_binary):
    report, cache = prepared_binary
    m = load_manifest(cache).to_pandas()
    per_patient = m.groupby("patient")["split"].nunique()
    assert (per_patient == 1).all()
    assert set(m[m.split == "val"].label) == {"normal", "finding"}
    assert report["splits"]["val"]["patients"] == m[m.split == "val"].patient.nunique() > 0


def test_cached_pixels_equal_reader(prepared_binary, synth_binary):
    from xray_dist.config import PreprocessSpec
    from xray_dist.data.dicom import load_image

    _, cache = prepared_binary
    n = 0
    for split in ("train", "val"):  # every cached image, all eight encodings among them
        paths, images = load_split_arrays(cache, split)
        for rel, img in zip(paths, images):
            np.testing.assert_array_equal(img, load_image(synth_binary.out / rel, PreprocessSpec(image_size=32)))
            n += 1
    assert n == len(synth_binary.files)


def test_nothing_identifying_written(ray_cluster, mixed_dir, tmp_path, capsys, caplog):
    data, labels, _ = mixed_dir
    caplog.set_level("DEBUG")
    assert run_prepare(data, labels, tmp_path / "c", "--seed", "1") == 0
    secrets = set()
    for f in data.rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - the corrupt corpus
            continue
        for kw in ("PatientName", "PatientID", "PatientBirthDate"):
            v = str(ds.get(kw, "") or "").strip()
            if len(v) >= 4:
                secrets.add(v)
    assert len(secrets) > 20
    texts = [capsys.readouterr().out, caplog.text]
    for f in (tmp_path / "c").rglob("*"):
        if f.is_file():
            texts.append(f.read_bytes().decode("latin-1"))
            if f.suffix == ".parquet":
                t = pq.read_table(f)
                for col in t.column_names:
                    if col != "image":
                        texts.append(" ".join(map(str, t.column(col).to_pylist())))
    blob = "\n".join(texts)
    leaked = sorted(s for s in secrets if s in blob)
    assert not leaked, leaked


def test_rerun_reuses_cache_and_settings_never_mix(ray_cluster, synth_binary, tmp_path):
    out = tmp_path / "cache"
    assert run_prepare(synth_binary.out, synth_binary.labels_csv, out) == 0
    first = json.loads((out / "prepare_report.json").read_text())
    m1 = load_manifest(out)
    mtime = sorted(p.stat().st_mtime_ns for p in (out / "images").glob("*.parquet"))
    assert run_prepare(synth_binary.out, synth_binary.labels_csv, out) == 0
    second = json.loads((out / "prepare_report.json").read_text())
    assert second["cache_reused"] and not first["cache_reused"]
    assert load_manifest(out).equals(m1)
    assert sorted(p.stat().st_mtime_ns for p in (out / "images").glob("*.parquet")) == mtime
    # a new seed re-splits without decoding again
    assert run_prepare(synth_binary.out, synth_binary.labels_csv, out, "--seed", "99") == 0
    assert json.loads((out / "prepare_report.json").read_text())["cache_reused"]
    # another image size must decode again, never mix
    assert cli.main(["prepare", str(synth_binary.out), "--labels", str(synth_binary.labels_csv), "--out", str(out),
                     "--image-size", "40"]) == 0
    third = json.loads((out / "prepare_report.json").read_text())
    assert not third["cache_reused"] and third["image_size"] == 40
    _, imgs = load_split_arrays(out, "train")
    assert imgs.shape[1:] == (40, 40)


def test_interrupted_prepare_decodes_only_what_is_missing(ray_cluster, synth_binary, tmp_path):
    out = tmp_path / "cache"
    assert run_prepare(synth_binary.out, synth_binary.labels_csv, out) == 0
    first = json.loads((out / "prepare_report.json").read_text())
    _, images = load_split_arrays(out, "train")
    chunks = sorted((out / "images").glob("chunk-*.parquet"))
    assert len(chunks) >= 3
    # as a prepare killed mid-way leaves it: no completion marker, one chunk never written; and two
    # files prepare never recorded writing (a half-written temporary file, a copy of a chunk)
    (out / "images" / "_COMPLETE.json").unlink()
    chunks[1].unlink()
    (out / "images" / "chunk-partial.tmp").write_bytes(b"PAR1 cut off")
    shutil.copy(chunks[0], out / "images" / "chunk-0000000000000000.parquet")
    kept = {p.name: p.stat().st_mtime_ns for p in chunks if p != chunks[1]}
    assert run_prepare(synth_binary.out, synth_binary.labels_csv, out) == 0
    now = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("chunk-*")}
    strays = {"chunk-partial.tmp", "chunk-0000000000000000.parquet"}
    assert set(now) == set(kept) | {chunks[1].name} | strays  # prepare deletes only what it recorded writing
    assert strays.isdisjoint(json.loads((out / "images" / "_COMPLETE.json").read_text())["chunks"])  # never read
    assert all(now[n] == t for n, t in kept.items())  # finished chunks were not decoded again
    second = json.loads((out / "prepare_report.json").read_text())
    same = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "decoded_now")}  # noqa: E731
    assert same(second) == same(first)
    import pyarrow.parquet as pq

    # the report says what this run decoded: the rows of the one missing chunk, nothing else
    assert first["decoded_now"] == first["found"]
    assert second["decoded_now"] == pq.read_table(out / "images" / chunks[1].name).num_rows < first["found"]
    np.testing.assert_array_equal(load_split_arrays(out, "train")[1], images)


def test_decode_chunks_largest_first_every_file_once():
    from xray_dist.data.decode import decode_chunks

    rels = [f"f{i:03d}" for i in range(300)]
    sizes = {r: (i * 37) % 101 for i, r in enumerate(rels)}
    chunks = decode_chunks(rels, sizes, cpus=2)
    flat = [r for c in chunks for r in c]
    assert sorted(flat) == rels  # every file, exactly once
    assert [sizes[r] for r in flat] == sorted(sizes.values(), reverse=True)
    assert max(len(c) for c in chunks) <= 64 and len(chunks) >= 8
    assert decode_chunks(rels[:5], sizes, cpus=2) == [[r] for r in sorted(rels[:5], key=lambda r: -sizes[r])]


def test_nothing_usable_fails_clearly(ray_cluster, tmp_path, capsys):
    data = tmp_path / "d"
    (data / "normal").mkdir(parents=True)
    (data / "normal" / "x.dcm").write_bytes(b"junk")
    rc = cli.main(["prepare", str(data), "--out", str(tmp_path / "c"), "--image-size", "32"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "x.dcm" in err and "not a DICOM" in err


def test_refuses_foreign_out_dir(tmp_path, synth_binary, capsys):
    (tmp_path / "notacache").mkdir()
    (tmp_path / "notacache" / "thesis.docx").write_text("precious")
    rc = run_prepare(synth_binary.out, synth_binary.labels_csv, tmp_path / "notacache")
    assert rc == 2 and "not an xray-dist cache" in capsys.readouterr().err


READ_UNDER_PRESSURE = """
import sys, ray
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)

@ray.remote(num_cpus=0.8)
class Worker:  # like a Train worker holding most of a small node
    def ping(self):
        return 1

w = Worker.remote()
ray.get(w.ping.remote())
from xray_dist.data.cache import read_cache_parquet
ds = read_cache_parquet(sys.argv[1], ["path", "image"], 0.1)
rows = sum(len(b["path"]) for b in ds.iter_batches(batch_size=16, batch_format="numpy"))
print("ROWS", rows)
"""


def test_cache_reads_never_wait_for_a_whole_cpu(prepared_binary, tmp_path):
    """Ray's read_parquet would stall here (a helper task wants 1 CPU; only 0.2 is free)."""
    import subprocess
    import sys

    report, cache = prepared_binary
    out = subprocess.run([sys.executable, "-c", READ_UNDER_PRESSURE, str(cache / "images")], capture_output=True,
                         text=True, timeout=180, cwd=tmp_path)
    assert f"ROWS {report['ok']}" in out.stdout, out.stderr[-2000:]


def test_a_small_cache_is_read_by_few_tasks_and_every_row_once(prepared_binary):
    """The cache's files go to read tasks in consecutive groups: a cache of a few hundred KB is one
    task (each task may be a new worker process), a large one at most ``parallelism`` tasks of at
    least TASK_BYTES each; every file in exactly one group, and the Dataset holds every row once."""
    import pyarrow.dataset as pads

    from xray_dist.data.cache import TASK_BYTES, _CacheParquetSource, read_cache_parquet, read_groups

    assert read_groups([1000] * 16, 8) == [list(range(16))]
    big = read_groups([TASK_BYTES] * 10, 4)
    assert len(big) == 4 and sorted(i for g in big for i in g) == list(range(10))
    assert [len(g) for g in read_groups([TASK_BYTES] * 3, 8)] == [1, 1, 1]
    assert read_groups([5], 8) == [[0]]
    _, cache = prepared_binary
    assert len(list((cache / "images").rglob("*.parquet"))) > 1  # several files, read by one task
    assert len(_CacheParquetSource(cache / "images", ["path"]).get_read_tasks(8)) == 1
    ds = read_cache_parquet(cache / "images", ["path", "image"], 0.25)
    paths = [p for b in ds.iter_batches(batch_size=16, batch_format="numpy") for p in b["path"]]
    truth = pads.dataset(str(cache / "images")).to_table(columns=["path"]).column("path").to_pylist()
    assert len(truth) > 1 and sorted(paths) == sorted(truth)  # every row, none twice
