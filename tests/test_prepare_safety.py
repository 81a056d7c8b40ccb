"""``prepare`` attacked where its promises are: pointed at its own inputs, asked to reverse its keys
from a cache alone, crashed between two writes that belong together, fed hostile files, and run
twice with one seed (issue 20 items 1, 2, 4 and 5; issue 21 item 1)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest

from xray_dist.data import fingerprint
from xray_dist.data.patients import hash_patient

from xray_dist.infra import storage
from xray_dist.cli.app import main
from xray_dist.data.synth import synthesize

pytestmark = pytest.mark.slow


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path (ground truth for "nothing touched")."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """12 patients × 2 images, 64 px: small enough to prepare in seconds."""
    return synthesize(tmp_path_factory.mktemp("small") / "dd", patients=12, images_per_patient=2, size=64, seed=7)


def prepare(data, out, *extra) -> int:
    return main(["prepare", str(data), "--labels", str(Path(data) / "labels.csv"), "--out", str(out),
                 "--image-size", "32", *map(str, extra)])


def manifest(cache) -> list[dict]:
    return pq.read_table(Path(cache) / "manifest.parquet").to_pylist()


# ---- item 1: a cache never overlaps its inputs ----------------------------------------------------------

@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_a_cache_overlapping_the_data_is_refused_and_nothing_is_touched(ray_cluster, small, tmp_path, capsys, where):
    data = tmp_path / "dd"
    shutil.copytree(small.out, data)
    before = digests(tmp_path)
    out = {"same": data, "parent": tmp_path, "inside": data / "cache"}[where]
    assert main(["prepare", str(data), "--labels", str(data / "labels.csv"), "--out", str(out),
                 "--image-size", "32"]) == 2
    err = capsys.readouterr().err
    assert "data directory" in err and len([ln for ln in err.splitlines() if ln.strip()]) == 1
    assert digests(tmp_path) == before  # every source file byte-identical, nothing added
    # prepare proj/images --out proj: the data directory inside the cache
    assert main(["prepare", str(data / "images"), "--out", str(data), "--image-size", "32"]) == 2
    assert digests(tmp_path) == before


def test_a_folder_with_an_images_entry_is_not_a_cache(ray_cluster, small, tmp_path):
    """The old rule took any folder with a top-level ``images`` entry for a cache and then deleted
    what it did not expect there; now only a folder holding prepare's own records is a cache."""
    other = tmp_path / "someone_elses"
    (other / "images").mkdir(parents=True)
    (other / "images" / "scan.dcm").write_bytes(small.files[0].read_bytes())
    before = digests(other)
    assert prepare(small.out, other) == 2
    assert digests(other) == before


def test_overlap_is_refused_on_object_storage(ray_cluster, s3_server, small):
    bucket = s3_server.bucket("overlap")
    s3_server.upload_dir(small.out, "overlap", "dd")
    keys = s3_server.keys("overlap")
    before = {k: s3_server.get("overlap", k) for k in keys}
    for out in (f"{bucket}/dd", bucket, f"{bucket}/dd/cache"):
        assert main(["prepare", f"{bucket}/dd", "--labels", f"{bucket}/dd/labels.csv", "--out", out,
                     "--image-size", "32"]) == 2
    assert s3_server.keys("overlap") == keys
    assert {k: s3_server.get("overlap", k) for k in keys} == before
    # a sibling prefix that merely starts alike is not inside: s3://b/dd-cache is apart from s3://b/dd
    assert storage.contains(f"{bucket}/dd", f"{bucket}/dd/x") and not storage.contains(f"{bucket}/dd", f"{bucket}/dd-c")


def test_clean_up_deletes_only_what_prepare_recorded(ray_cluster, small, tmp_path):
    """A re-decode (other inputs) removes the earlier chunks prepare recorded, and nothing else
    that happens to lie in the cache's images folder."""
    data = tmp_path / "dd"
    shutil.copytree(small.out, data)
    cache = tmp_path / "cache"
    assert prepare(data, cache) == 0
    first = set(json.loads((cache / "images" / "_COMPLETE.json").read_text())["chunks"])
    assert first and first == {p.name for p in (cache / "images").glob("chunk-*.parquet")}
    stranger = cache / "images" / "notes.txt"
    stranger.write_text("a user's note")
    leftover = cache / "images" / ".writing_1_2_chunk-0123456789abcdef0123.parquet"  # a crash's partial write
    leftover.write_bytes(b"PAR1 partial")
    (data / small.files[0].relative_to(small.out)).write_bytes(small.files[1].read_bytes())  # inputs changed
    assert prepare(data, cache) == 0
    now = set(json.loads((cache / "images" / "_COMPLETE.json").read_text())["chunks"])
    assert now != first and not (first - now) & {p.name for p in (cache / "images").iterdir()}
    assert stranger.read_text() == "a user's note" and leftover.exists()
    assert len(manifest(cache)) == len(small.files)  # the partial file is never read as data


# ---- item 2: the cache holds no salt, and nothing in it reverses a key -----------------------------------

def brute_force(cache: Path, ids: list[str]) -> set[str]:
    """Every raw ID of ``ids`` whose key appears in the cache's manifest, for every salt candidate
    the cache itself offers: each file's whole text and each of its tokens (the attack of the issue:
    only the cache in hand)."""
    keys = {r["patient"] for r in manifest(cache)}
    candidates = {""}
    for f in cache.rglob("*"):
        if f.is_file() and f.suffix != ".parquet":
            text = f.read_bytes().decode("utf-8", "replace")
            candidates |= {text, text.strip(), *text.replace('"', " ").replace(",", " ").split()}
    return {i for salt in candidates for i in ids
            for kind in ("pid:", "labels:", "study:") if hash_patient(salt, kind + i) in keys}


def test_a_default_cache_cannot_be_reversed(ray_cluster, small, tmp_path, monkeypatch):
    monkeypatch.delenv("XRAY_DIST_SALT", raising=False)
    secrets_dir = tmp_path / "home_secrets"
    monkeypatch.setenv("XRAY_DIST_SECRETS_DIR", str(secrets_dir))
    cache = tmp_path / "cache"
    assert prepare(small.out, cache) == 0
    ids = [f"SYN007{p:05d}" for p in range(2000)]  # the small ID space that holds every true ID
    true = set(small.patients.values())
    assert true <= set(ids)
    assert not list(cache.rglob("*salt*"))
    salt = (secrets_dir / "salt").read_text().strip()
    for f in cache.rglob("*"):  # ground truth: the salt's bytes are in no file of the cache, Parquet included
        assert not f.is_file() or salt.encode() not in f.read_bytes(), f
    assert brute_force(cache, ids) == set()
    # control: with the salt the user keeps (outside the cache) the same search finds every patient,
    # so the search above could have succeeded
    salt_file = secrets_dir / "salt"
    assert oct(salt_file.stat().st_mode & 0o777) == "0o600" and oct(secrets_dir.stat().st_mode & 0o777) == "0o700"
    keys = {r["patient"] for r in manifest(cache)}
    salt = salt_file.read_text().strip()
    assert {i for i in ids if hash_patient(salt, "pid:" + i) in keys} == true
    # and a cache that keeps its salt (the old layout) is reversed by that search: what the fix prevents
    (cache / ".salt").write_text(salt)
    assert brute_force(cache, ids) == true


def test_short_salts_and_salts_inside_the_cache_are_refused(ray_cluster, small, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("XRAY_DIST_SALT", raising=False)
    empty = tmp_path / "empty_salt"
    empty.write_text("")
    short = tmp_path / "short_salt"
    short.write_text("0123456789abcde")  # 15 bytes
    for f in (empty, short):
        assert prepare(small.out, tmp_path / f"c_{f.name}", "--salt-file", f) == 2
        assert "at least 16" in capsys.readouterr().err
        assert not (tmp_path / f"c_{f.name}").exists()  # refused before anything was written
    assert prepare(small.out, tmp_path / "c_in", "--salt-file", tmp_path / "c_in" / "salt") == 2
    assert "inside the cache" in capsys.readouterr().err
    assert not (tmp_path / "c_in").exists()
    monkeypatch.setenv("XRAY_DIST_SALT", "short")
    assert prepare(small.out, tmp_path / "c_env") == 2
    assert "XRAY_DIST_SALT" in capsys.readouterr().err


def test_an_old_cache_with_its_salt_keeps_its_keys_with_a_warning(ray_cluster, small, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("XRAY_DIST_SALT", raising=False)
    cache = tmp_path / "cache"
    old_salt = "f" * 32
    monkeypatch.setenv("XRAY_DIST_SALT", old_salt)
    assert prepare(small.out, cache) == 0
    monkeypatch.delenv("XRAY_DIST_SALT")
    (cache / ".salt").write_text(old_salt)  # as caches made before this change hold it
    keys = {r["path"]: r["patient"] for r in manifest(cache)}
    with caplog.at_level("WARNING"):
        assert prepare(small.out, cache) == 0
    assert {r["path"]: r["patient"] for r in manifest(cache)} == keys
    assert any("move it out" in r.getMessage() for r in caplog.records)


# ---- issue 21 item 1: one split for one seed ----------------------------------------------------------

def split_by_patient(cache: Path, pids: dict[str, str]) -> dict[str, str]:
    return {pids[r["path"]]: r["split"] for r in manifest(cache)}


def test_the_split_is_a_function_of_the_files_and_the_seed(ray_cluster, small, tmp_path, monkeypatch):
    """Two fresh caches with different salts (the default salt differs per user) and the same seed
    split the same patients the same way; another seed splits them otherwise; the report's split
    fingerprint says so without the manifests."""
    runs = {}
    for name, salt, seed, extra in (("a", "a" * 32, 0, ()), ("b", "b" * 32, 0, ()), ("c", "c" * 32, 0,
                                    ("--redact-paths",)), ("d", "a" * 32, 1, ())):
        monkeypatch.setenv("XRAY_DIST_SALT", salt)
        cache = tmp_path / name
        assert prepare(small.out, cache, "--seed", seed, "--test-fraction", "0.25", *extra) == 0
        report = json.loads((cache / "prepare_report.json").read_text())
        runs[name] = (report["split_fingerprint"], cache)
    a, b = (split_by_patient(runs[k][1], small.patients) for k in "ab")
    assert a == b and set(a.values()) == {"train", "val", "test"}
    assert {r["patient"] for r in manifest(runs["a"][1])}.isdisjoint({r["patient"] for r in manifest(runs["b"][1])})
    assert runs["a"][0] == runs["b"][0] == runs["c"][0]  # a redacted cache too: its fingerprint uses no salt
    d = split_by_patient(runs["d"][1], small.patients)
    assert d != a and runs["d"][0] != runs["a"][0]


# ---- item 4: a manifest and its fingerprint are seen together ---------------------------------------------

def test_a_crash_between_manifest_and_fingerprint_cannot_pass_a_resplit(ray_cluster, small, tmp_path, monkeypatch):
    cache, run = tmp_path / "cache", tmp_path / "run"
    assert prepare(small.out, cache, "--seed", "0") == 0
    fingerprint.record(str(run), str(cache), fingerprint.check_unchanged(str(run), str(cache), "run"))

    def crash(*a, **k):
        raise KeyboardInterrupt("killed between the manifest and its fingerprint")

    monkeypatch.setattr(fingerprint, "write", crash)
    assert prepare(small.out, cache, "--seed", "1") == 130  # the manifest is re-split, the old fingerprint.json stays
    assert json.loads((cache / "fingerprint.json").read_text()) == json.loads((run / "inputs.json").read_text())[
        "cache_fingerprint"]
    monkeypatch.undo()
    from xray_dist.errors import CacheError

    with pytest.raises(CacheError, match="split"):
        fingerprint.check_unchanged(str(run), str(cache), "run")


# ---- item 5: hostile files get a reason, never a crash -------------------------------------------------

def header_bomb(src: Path, dest: Path, side: int = 40000) -> Path:
    """A small DICOM whose header claims ``side`` × ``side`` pixels (its pixel data is what it was)."""
    ds = pydicom.dcmread(src)
    ds.Rows = ds.Columns = side
    ds.save_as(dest)
    return dest


def test_a_header_bomb_is_refused_from_its_header_in_little_memory(small, tmp_path):
    import subprocess
    import sys

    src = next(f for f in small.files if "rle" in f.name)  # RLE's decoder allocates what the header claims
    bomb = header_bomb(src, tmp_path / "bomb.dcm")
    assert bomb.stat().st_size < 16_000
    # the process's own peak: VmHWM of its address space (ru_maxrss would also count the pages it
    # shared with this test process between fork and exec: a pytest that loaded TensorFlow is GBs)
    code = ("import sys; from xray_dist.data.dicom import load_image; from xray_dist.config import PreprocessSpec\n"
            "try:\n    load_image(sys.argv[1], PreprocessSpec(image_size=32, max_pixels=int(sys.argv[2])))\n"
            "except Exception as e:\n    print(type(e).__name__, getattr(e, 'kind', ''), e)\n"
            "print('PEAK', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n")

    def run(max_pixels: int) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", code, str(bomb), str(max_pixels)], capture_output=True, text=True,
                             timeout=300).stdout
        return out, int(out.split("PEAK")[-1]) * 1024  # bytes (VmHWM is in kB)

    out, peak = run(60_000_000)
    assert "too_large" in out and "40000 x 40000" in out
    assert peak < 1 << 30, f"refusing the bomb peaked at {peak / 2**20:.0f} MiB"


def test_hostile_and_cut_off_files_are_quarantined_with_their_reasons(ray_cluster, small, tmp_path):
    data = tmp_path / "dd"
    shutil.copytree(small.out, data)
    good = next(f for f in small.files if "mono2_u16_explicit" in f.name)
    raw = good.read_bytes()
    pixel_at = raw.find(b"\xe0\x7f\x10\x00")
    hostile = {"images/bomb.dcm": None, "images/cut_in_pixels.dcm": raw[: (pixel_at + len(raw)) // 2],
               "images/cut_before_pixels.dcm": raw[:pixel_at], "images/cut_in_header.dcm": raw[:400]}
    header_bomb(good, data / "images" / "bomb.dcm", 65535)
    for rel, b in hostile.items():
        if b is not None:
            (data / rel).write_bytes(b)
    with (data / "labels.csv").open("a") as f:
        f.writelines(f"{rel},normal\n" for rel in hostile)
    cache = tmp_path / "cache"
    assert prepare(data, cache) == 0
    report = json.loads((cache / "prepare_report.json").read_text())
    reasons = {q["path"]: q["reason"] for q in report["quarantined"]}
    assert set(reasons) == set(hostile)
    assert reasons["images/bomb.dcm"].startswith("too_large:")
    for rel in ("images/cut_in_pixels.dcm", "images/cut_before_pixels.dcm", "images/cut_in_header.dcm"):
        assert reasons[rel].startswith("truncated:"), reasons[rel]
    assert report["ok"] == len(small.files)


def test_a_killed_decode_task_quarantines_its_file_and_prepare_goes_on(ray_cluster, small, tmp_path, monkeypatch):
    """A decode process killed by SIGKILL (what an out-of-memory killer does; injected for one
    file): that file is quarantined with the reason, every other file of its chunk is used."""
    from xray_dist.data.decode import FAULT_KILL_ENV

    victim = sorted(small.labels)[5]
    monkeypatch.setenv(FAULT_KILL_ENV, victim)
    cache = tmp_path / "cache"
    assert prepare(small.out, cache) == 0
    report = json.loads((cache / "prepare_report.json").read_text())
    assert [q["path"] for q in report["quarantined"]] == [victim]
    assert report["quarantined"][0]["reason"].startswith("killed:")
    assert report["ok"] == len(small.files) - 1
    assert {r["path"] for r in manifest(cache)} == set(small.labels) - {victim}
