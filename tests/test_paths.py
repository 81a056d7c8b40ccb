"""How outputs name input files (xray_dist.data.paths): relative by default, salted keys with
--redact-paths — and with it, no input path in anything xray-dist writes or logs."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xray_dist.data.paths import REDACT, RELATIVE, PathNames, named_inputs


class TestNames:
    def test_relative_names_are_the_relative_path(self):
        n = PathNames()
        assert n.name("a/b.dcm") == "a/b.dcm" and n.location("/data/x") == "/data/x"

    def test_redacted_names_are_salted_keys(self):
        a, b = PathNames(REDACT, "salt-1"), PathNames(REDACT, "salt-2")
        key = a.name("SMITH/b.dcm")
        assert key.startswith("f_") and len(key) == 18 and "SMITH" not in key
        assert a.name("SMITH/b.dcm") == key != a.name("SMITH/c.dcm")  # stable, one per file
        assert b.name("SMITH/b.dcm") != key  # another salt: keys that cannot be joined
        assert "/data" not in a.location("/data/SMITH")
        with pytest.raises(ValueError, match="salt"):
            PathNames(REDACT, "")
        with pytest.raises(ValueError, match="policy"):
            PathNames("hide")

    def test_error_text_is_scrubbed_of_the_path(self):
        msg = "could not read the file: [Errno 13] Permission denied: '/data/SMITH/b.dcm' (SMITH/b.dcm, b.dcm)"
        relative = PathNames(RELATIVE).scrub(msg, "/data/SMITH/b.dcm", "SMITH/b.dcm")
        assert "/data/" not in relative and "SMITH/b.dcm" in relative
        red = PathNames(REDACT, "s")
        scrubbed = red.scrub(msg, "/data/SMITH/b.dcm", "SMITH/b.dcm")
        assert "SMITH" not in scrubbed and "b.dcm" not in scrubbed and red.name("SMITH/b.dcm") in scrubbed

    def test_inputs_are_named_relative_to_what_was_given(self):
        listing = {"/data/SMITH": ["x/1.dcm", "2.dcm"]}
        files, rels = named_inputs(["/data/SMITH", "/elsewhere/JONES/3.dcm", "here/4.dcm", "s3://b/k/5.dcm"],
                                   lambda item: listing.get(item))
        assert files == ["/data/SMITH/x/1.dcm", "/data/SMITH/2.dcm", "/elsewhere/JONES/3.dcm", "here/4.dcm",
                         "s3://b/k/5.dcm"]
        assert rels == ["x/1.dcm", "2.dcm", "3.dcm", "here/4.dcm", "5.dcm"]

    def test_salt_from_the_environment_or_a_file(self, tmp_path, monkeypatch):
        import os

        from xray_dist.data.salt import SaltError, resolve

        monkeypatch.delenv("XRAY_DIST_SALT", raising=False)
        monkeypatch.setenv("XRAY_DIST_SECRETS_DIR", str(tmp_path / "user"))
        made = resolve(str(tmp_path / "salt"))  # made where named, 0600 from the start
        assert len(made) >= 32 and (tmp_path / "salt").read_text() == made and resolve(str(tmp_path / "salt")) == made
        assert oct(os.stat(tmp_path / "salt").st_mode & 0o777) == "0o600"
        default = resolve()  # no file named: the per-user secret, the same for every command
        assert default == resolve() and (tmp_path / "user" / "salt").read_text() == default != made
        assert oct(os.stat(tmp_path / "user" / "salt").st_mode & 0o777) == "0o600"
        monkeypatch.setenv("XRAY_DIST_SALT", "from-env-0123456789")
        assert resolve(str(tmp_path / "salt")) == "from-env-0123456789"
        monkeypatch.setenv("XRAY_DIST_SALT", "")
        with pytest.raises(SaltError, match="at least 16"):
            resolve()


def test_a_path_map_inside_the_cache_is_refused():
    from xray_dist.config import PrepareConfig

    with pytest.raises(ValueError, match="inside the cache"):
        PrepareConfig(data_dir="d", out="/tmp/c", paths="redact", path_map="/tmp/c/map.csv")
    with pytest.raises(ValueError, match="redact"):
        PrepareConfig(data_dir="d", out="/tmp/c", path_map="/tmp/map.csv")


# ---- end to end ------------------------------------------------------------------------------------

TOKENS = ("MRN90210", "DoeJane")  # in the data directory's name and in every file name


def _strings_of(path: Path) -> str:
    """What a file holds as text: Parquet decoded (its strings may be compressed on disk), others raw."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return str(pq.read_table(path).drop_columns([c for c in ("image", "x") if c in
                                                     pq.read_schema(path).names]).to_pylist())
    return path.read_bytes().decode("latin-1")


@pytest.mark.slow
def test_redacted_paths_leave_no_input_path_in_any_output(ray_cluster, synth_binary, tmp_path):
    """prepare → train → predict → explain → report with --redact-paths: every file written (the
    cache, the run with Ray's own files, the CSVs, the heatmaps' names, the HTML) and everything
    printed holds no part of an input path; the salted keys join predict's rows to the cache's."""
    import pyarrow.parquet as pq

    root = tmp_path / "ward7_DoeJane_MRN90210"  # a data directory named after a patient
    data = root / "dicom"
    rows = []
    for i, (rel, label) in enumerate(sorted(synth_binary.labels.items())[:48]):
        name = f"{'abnormal' if i % 3 == 0 else 'study'}/DoeJane_MRN90210_{i:03d}.dcm"
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(synth_binary.out / rel, data / name)
        rows.append((name, label))
    (data / "study" / "DoeJane_MRN90210_bad.dcm").write_bytes(b"\0" * 200)  # quarantined, with its reason
    rows.append(("study/DoeJane_MRN90210_bad.dcm", "normal"))
    rows.append(("study/DoeJane_MRN90210_gone.dcm", "finding"))  # a label row with no file
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    secret = tmp_path / "keys"  # salt and path map: kept apart from everything shared
    secret.mkdir()
    work = tmp_path / "shared"
    cache, run, out = work / "cache", work / "run", work / "out"
    # every command's log file (prepare's, predict's, ... as well as the run's) among what is scanned
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "XRAY_DIST_LOG_DIR": str(work / "logs")}
    env.pop("XRAY_DIST_SALT", None)
    printed = []

    def xd(*args):
        p = subprocess.run([sys.executable, "-m", "xray_dist.cli", *map(str, args)], capture_output=True,
                           text=True, env=env, cwd=tmp_path, timeout=600)
        printed.append(p.stdout + p.stderr)
        assert p.returncode == 0, p.stdout + p.stderr
        return p

    xd("prepare", data, "--labels", labels, "--out", cache, "--image-size", "32", "--redact-paths",
       "--salt-file", secret / "salt", "--path-map", secret / "map.csv")
    xd("train", "--cache", cache, "--out", run, "--epochs", "1", "--batch-size", "8", "--weights", "none",
       "--unfreeze-blocks", "1", "--num-workers", "1", "--cpus-per-worker", "0.5")
    xd("predict", "--model", run, data, "--out", out / "preds.csv", "--redact-paths", "--salt-file", secret / "salt")
    xd("explain", "--model", run, data / "abnormal" / "DoeJane_MRN90210_000.dcm",
       data / "study" / "DoeJane_MRN90210_bad.dcm", "--out", out / "explain", "--redact-paths",
       "--salt-file", secret / "salt")
    xd("report", run, "--out", out / "report.html", "--bootstrap", "20")

    written = [f for f in work.rglob("*") if f.is_file()]
    assert len(written) > 30 and any(f.suffix == ".parquet" for f in written)
    leaks = {str(f.relative_to(work)): [t for t in TOKENS if t in str(f.relative_to(work)) + _strings_of(f)]
             for f in written}
    assert not {f: t for f, t in leaks.items() if t}, "input paths in outputs"
    assert not [t for t in TOKENS if t in "".join(printed)], "input paths printed"

    # nothing is lost: the map (outside the outputs) turns every key back into its file
    with open(secret / "map.csv") as f:
        path_of = {r["key"]: r["path"] for r in csv.DictReader(f)}
    report = __import__("json").loads((cache / "prepare_report.json").read_text())
    assert report["paths"] == "redact" and report["ok"] == 48 and len(report["quarantined"]) == 1
    assert path_of[report["quarantined"][0]["path"]].endswith("DoeJane_MRN90210_bad.dcm")
    assert path_of[report["missing"][0]["path"]] == "study/DoeJane_MRN90210_gone.dcm"
    manifest = pq.read_table(cache / "manifest.parquet").to_pylist()
    assert all(path_of[m["path"]].startswith(str(data)) for m in manifest)
    # the same salt gives predict's rows the cache's keys: predictions join the manifest
    with open(out / "preds.csv") as f:
        preds = {r["path"]: r for r in csv.DictReader(f)}
    assert {m["path"] for m in manifest} < set(preds)
    assert preds[report["quarantined"][0]["path"]]["error"].startswith("not_dicom")
    explained = sorted(p.name for p in (out / "explain").iterdir())
    assert len([n for n in explained if n.endswith(".png")]) == 1 and all(n.startswith(("f_", "explain")) for n in explained)
