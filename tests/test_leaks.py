"""No identity and no credential in any output: with --redact-paths the inputs' locations (a
patient's name and record number in a folder name) are in no line printed and no file written,
errors included; pydicom's warnings never carry the value they quote; a tracking URI's
credentials are used, never written or logged (here for a sweep's pickled callback; a train run's in
tests/test_tracking.py, with its resume); a salt predict makes is private (0600).

Secrets are planted in the inputs and searched for in everything the real CLI prints and in
every file under its log directory and its outputs (the approach of test_paths' end-to-end test,
with failing commands and pydicom's validation warnings added)."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from xray_dist.cli import app as cli

from xray_dist.infra import console, redaction, worker_output

PATIENT = "SMITH_JOHN_MRN7654321"  # a folder named after a patient, as PACS exports often are
NEEDLES = ("SMITH", "JOHN", "7654321")


def _strings_of(path: Path) -> str:
    from test_paths import _strings_of as strings  # Parquet decoded, other files as bytes

    return strings(path)


def _found(text: str, needles=NEEDLES) -> list[str]:
    return [n for n in needles if n in text]


def _leaks(roots: list[Path], needles=NEEDLES) -> dict[str, list[str]]:
    """Each file under ``roots`` (its path and its content) that holds a needle, with the needles."""
    out = {}
    for root in roots:
        for f in sorted(root.rglob("*")):
            if f.is_file() and _found(str(f.relative_to(root)) + _strings_of(f), needles):
                out[str(f)] = _found(str(f.relative_to(root)) + _strings_of(f), needles)
    return out


# ---- the masking rules (no Ray, no server) ------------------------------------------------------

@pytest.mark.parametrize("uri, shown", [
    ("http://user:s3cr3t@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
    ("https://tok3n@mlflow.example.org/api", "https://***@mlflow.example.org/api"),
    ("http://u:p@ss@host:1/x", "http://***@host:1/x"),  # an unencoded '@' in the password
    ("https://h/x?token=abc&run=1", "https://h/x?token=***&run=1"),
    ("https://h/x?access_token=abc", "https://h/x?access_token=***"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AK%2F1&X-Amz-Signature=f00d&X-Amz-Date=2024",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Date=2024"),
    ("https://a.blob.core.windows.net/c?sv=2022&sig=abc%3D", "https://a.blob.core.windows.net/c?sv=2022&sig=***"),
    ("db://h/x?password=pw;api_key=k", "db://h/x?password=***;api_key=***"),
    ("see http://u:pw@h:1 and http://v:pw2@g:2.", "see http://***@h:1 and http://***@g:2."),
    # nothing secret: unchanged
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("s3://bucket/key@v2?versionId=3", "s3://bucket/key@v2?versionId=3"),
    ("mail jane@example.org", "mail jane@example.org"),
])
def test_credentials_in_a_uri_are_masked(uri, shown):
    assert redaction.mask_credentials(uri) == shown


def test_protected_locations_are_replaced_in_every_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / PATIENT
    (root / "images").mkdir(parents=True)
    (root / "labels.csv").write_text("path,label\n")
    (tmp_path / "link").symlink_to(root)  # given through a link: the resolved path is protected too
    try:
        redaction.protect(f"{PATIENT}/labels.csv", "<labels>")
        redaction.protect("link/images/", "<data>")
        lines = {
            f"{root}/labels.csv: no column 'label'": "<labels>: no column 'label'",
            f"{PATIENT}/labels.csv, line 3": "<labels>, line 3",
            f"{root}/images/a.dcm: unreadable": "<data>/a.dcm: unreadable",
            f"{tmp_path}/link/images/a.dcm": "<data>/a.dcm",
            "link/images: 48 images": "<data>: 48 images",  # the word stays; the folder goes
            f"--split-file {root}/x/test_list.txt": f"--split-file {tmp_path}/<redacted>/x/test_list.txt",
            f"key {PATIENT}_2.dcm": "key <redacted>_2.dcm",
            f"{root}/labels.csvx": f"{tmp_path}/<redacted>/labels.csvx",  # another file: its folder still goes
        }
        for text, expected in lines.items():
            assert redaction.scrub(text) == expected
        assert len(lines) == 8
    finally:
        redaction.forget()
    assert redaction.scrub(f"{root}/labels.csv") == f"{root}/labels.csv"  # forgotten at the command's end


def test_pydicom_values_are_masked_on_the_terminal_and_in_the_log(tmp_path, capfd):
    """-v shows pydicom's records on the terminal: masked there as in the log, whether they come
    as a record of its logger, a Python warning, a Ray worker's line or a plain print."""
    from pydicom import config
    from pydicom.valuerep import validate_value

    log = tmp_path / "cmd.log"
    uid = f"1.2.840.SMITH.JOHN.7654321.{secrets.randbelow(10**6)}"  # unique: a warning shown once per text
    console.setup(console.VERBOSE, log)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            validate_value("UI", uid, config.WARN)  # pydicom's logger and a UserWarning
        worker_output._route_worker_lines({"pid": 7, "lines": [
            f"/x/pydicom/valuerep.py:440: UserWarning: Invalid value for VR UI: '{uid}'. Please see"]})
        print("(pid=8) /x/pydicom/valuerep.py:440: UserWarning: Invalid value for VR PN: 'SMITH^JOHN'",
              file=sys.stderr)
    finally:
        console.finish()
    terminal = "".join(capfd.readouterr())
    logged = log.read_text()
    assert terminal.count("Invalid value for VR UI: '…'") == 2 and "Invalid value for VR PN: '…'" in terminal
    assert logged.count("Invalid value for VR UI: '…'") == 3  # the logger's record, the warning, the worker line
    assert not _found(terminal) and not _found(logged)


def test_a_worker_process_masks_pydicom_warnings_at_the_source():
    """Ray keeps each worker's stderr in its session's files: a worker that ran
    worker_output.mask_pydicom_warnings (Ray's worker_process_setup_hook) prints the warning masked."""
    code = ("from xray_dist.infra.worker_output import mask_pydicom_warnings as m; m(); m()\n"
            "from pydicom import config\nfrom pydicom.valuerep import validate_value\n"
            "validate_value('UI', '1.2.840.SMITH.JOHN.7654321', config.WARN)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Invalid value for VR UI: '…'" in p.stderr and not _found(p.stderr)
    bare = subprocess.run([sys.executable, "-c", code.split("\n", 1)[1]], capture_output=True, text=True, timeout=120)
    assert "SMITH" in bare.stderr  # without the hook the value is printed: the hook is what masks it


def test_a_sweeps_pickled_mlflow_callback_holds_no_credentials(monkeypatch):
    """Ray Tune pickles its callbacks into the sweep's tuner.pkl: the URI goes in masked, and a
    restored callback gets the credentials back from MLFLOW_TRACKING_URI (or the flag)."""
    import ray.cloudpickle as pickle

    from xray_dist.results import tracking

    uri = "http://xray:s3cr3tpw@127.0.0.1:9/?token=t0k3n"
    callback = tracking.sweep_callback(uri, "/sweeps/s1")
    blob = pickle.dumps(callback)
    assert b"s3cr3tpw" not in blob and b"t0k3n" not in blob and callback.tracking_uri == uri
    restored = pickle.loads(blob)
    assert restored.tracking_uri == "http://***@127.0.0.1:9/?token=***"
    tracking._KNOWN.clear()  # a new process: only the environment knows the URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking.unmasked(restored.tracking_uri) == uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://xray:other@127.0.0.1:9/?token=t0k3n")
    assert tracking.unmasked("http://***@127.0.0.1:9/?token=***") == "http://xray:other@127.0.0.1:9/?token=t0k3n"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.unmasked(restored.tracking_uri) is None and tracking.unmasked("http://h:1") == "http://h:1"


# ---- the real CLI --------------------------------------------------------------------------------

def _patient_tree(base: Path, synth, n: int = 16) -> tuple[Path, Path]:
    """``base/SMITH_JOHN_MRN7654321/{images/*.dcm, labels.csv}``; one file's Study Instance UID
    holds the name (letters: pydicom warns, quoting it) and, without a Patient ID, is the one
    read for its patient key."""
    import csv

    import pydicom

    data = base / PATIENT / "images"
    data.mkdir(parents=True)
    rows = []
    for i, (rel, label) in enumerate(sorted(synth.labels.items())[:n]):
        shutil.copy(synth.out / rel, data / f"img{i:03d}.dcm")
        rows.append((f"img{i:03d}.dcm", label))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(data / "img000.dcm")
        del ds.PatientID
        ds.StudyInstanceUID = f"1.2.840.SMITH.JOHN.7654321.{secrets.randbelow(10**6)}"
        ds.save_as(data / "img000.dcm")
    labels = base / PATIENT / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    return data, labels


@pytest.mark.slow
def test_redacted_inputs_appear_in_no_line_and_no_file(ray_cluster, synth_binary, two_worker_run, tmp_path):
    """prepare (two refused, one with a pydicom warning quoting the name) and predict (one with an
    unreadable file, one with nothing readable) with --redact-paths, -v on two: the terminal, every
    log file and every output hold no part of the patient's folder name; the errors name their
    input by its placeholder. (-v's terminal with pydicom's warnings on it: the test above.)"""
    _, _, model = two_worker_run
    data, labels = _patient_tree(tmp_path, synth_binary)
    bad_labels = labels.with_name("labels_bad.csv")
    bad_labels.write_text(labels.read_text().replace("path,label", "path,finding", 1))
    bad_split = labels.with_name("splits.txt")  # a plain list that does not say its split
    bad_split.write_text("img001.dcm\n")
    broken = data.parent / "broken"
    broken.mkdir()
    (broken / "x.dcm").write_bytes(b"\0" * 300)
    (data / "zz_broken.dcm").write_bytes(b"\0" * 300)  # predict: one unreadable row among the scored
    keys = tmp_path / "keys"  # salt: kept apart from what is shared
    keys.mkdir()
    work = tmp_path / "shared"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "XRAY_DIST_LOG_DIR": str(work / "logs")}
    env.pop("XRAY_DIST_SALT", None)
    printed = []

    def xd(code: int, *args, fresh_ray: bool = False) -> str:
        # fresh_ray: an embedded Ray of its own, whose new workers print each warning (a Python warning
        # is shown once per process) and whose output reaches this driver's log
        p = subprocess.run([sys.executable, "-m", "xray_dist.cli", *map(str, args)], capture_output=True, text=True,
                           env={k: v for k, v in env.items() if k != "RAY_ADDRESS"} if fresh_ray else env,
                           cwd=tmp_path, timeout=600)
        printed.append(p.stdout + p.stderr)
        assert p.returncode == code, p.stdout + p.stderr
        return p.stderr

    redact = ("--redact-paths", "--salt-file", keys / "salt")
    err = xd(2, "prepare", data, "--labels", bad_labels, "--out", work / "c0", *redact)
    assert "xray-dist prepare: error: <labels>: no column 'label'" in err
    err = xd(2, "prepare", data.relative_to(tmp_path), "--labels", labels, "--split-file", bad_split,
             "--out", work / "c1", "-v", *redact)
    assert "error: --split-file <split-file>: a plain list must say its split in its name" in err
    xd(0, "prepare", data, "--labels", labels.relative_to(tmp_path), "--out", work / "cache", "--image-size", "32",
       "--num-cpus", "1", *redact, fresh_ray=True)
    xd(0, "predict", "--model", model, data, "--out", work / "out" / "preds.csv", "-v", *redact)
    err = xd(1, "predict", "--model", model, broken / "x.dcm", "--out", work / "out" / "none.csv", *redact)
    assert "none of the 1 files could be scored" in err

    terminal = "".join(printed)
    assert len(printed) == 5
    # the pydicom warning was there (from prepare's Ray workers, in its log), masked
    logs = sorted((work / "logs").glob("*.log"))
    assert len(logs) == 5 and "Invalid value for VR UI: '…'" in "".join(f.read_text() for f in logs)
    assert not _found(terminal), [line for line in terminal.splitlines() if _found(line)][:5]
    written = [f for f in work.rglob("*") if f.is_file()]
    assert len(written) > 10 and any(f.suffix == ".parquet" for f in written)
    assert not _leaks([work]), "identity in a file written"


@pytest.mark.slow
def test_predict_makes_a_new_salt_file_readable_by_its_owner_only(two_worker_run, synth_binary, tmp_path,
                                                                   monkeypatch):
    _, _, model = two_worker_run
    monkeypatch.delenv("XRAY_DIST_SALT", raising=False)
    new = tmp_path / "keys" / "NEW"
    new.parent.mkdir()
    old = os.umask(0o022)  # what a default umask makes of a plain open(): 0644, readable by all
    try:
        assert cli.main(["predict", "--model", str(model), str(synth_binary.out / sorted(synth_binary.labels)[0]),
                         "--out", str(tmp_path / "p.csv"), "--redact-paths", "--salt-file", str(new)]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(new.stat().st_mode) == 0o600
    assert len(new.read_text().strip()) >= 32

