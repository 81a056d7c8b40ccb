"""Straight from the archive (#24): ``prepare`` from a DICOMweb query against a real Orthanc server
(Debian's ``orthanc`` and ``orthanc-dicomweb``, started here on 127.0.0.1 with authentication on),
the synthetic cohort stored in it with STOW-RS in every synthetic transfer syntax (JPEG 2000 and
RLE included)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from xray_dist.data.synth import synthesize

USER, PASSWORD = "xray-test", "pw-" + os.urandom(6).hex()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from orthanc import Orthanc, available  # noqa: E402 - bench's own Orthanc, shared with the benchmark


@pytest.fixture(scope="session")
def archive(tmp_path_factory):
    if not available():
        if os.environ.get("XRAY_DIST_REQUIRE_ORTHANC"):
            pytest.fail("Orthanc is required (XRAY_DIST_REQUIRE_ORTHANC is set) but not installed")
        pytest.skip("Orthanc not installed (apt-get install orthanc orthanc-dicomweb)")
    try:
        a = Orthanc(tmp_path_factory.mktemp("orthanc"), USER, PASSWORD)
    except RuntimeError as e:
        pytest.fail(str(e))
    yield a
    a.stop()


@pytest.fixture(scope="session")
def stored(archive, tmp_path_factory):
    """20 patients × 2 images in every synthetic encoding, stored with STOW-RS; a labels CSV joined on
    SOPInstanceUID (one stored instance left unlabelled, one label row for an instance the archive
    does not have): (synth result, labels CSV, SOP UID of each file)."""
    root = tmp_path_factory.mktemp("stored")
    syn = synthesize(root / "data", patients=20, images_per_patient=2, size=64, seed=5)
    datasets = [pydicom.dcmread(f) for f in syn.files]
    for d in datasets:  # as a RIS gives them: one accession number per study, in the archive only
        d.AccessionNumber = f"ACX{int(d.StudyInstanceUID.rsplit('.', 1)[1]) % 10**12:012d}"
    archive.client().store_instances(datasets)
    sop_of = {str(f.relative_to(syn.out)): d.SOPInstanceUID for f, d in zip(syn.files, datasets)}
    rows = [[sop_of[rel], label] for rel, label in syn.labels.items()][1:]  # the first file: no label
    rows.append(["1.2.826.0.1.3680043.8.498.999999", "finding"])  # an instance the archive lacks
    labels = root / "labels_by_uid.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["SOPInstanceUID", "label"])
        w.writerows(rows)
    return syn, labels, sop_of


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.setenv("XRAY_DIST_DICOMWEB_USER", USER)
    monkeypatch.setenv("XRAY_DIST_DICOMWEB_PASSWORD", PASSWORD)


def _images(cache: Path, path_map: Path) -> dict[str, tuple]:
    """Each image of a cache by the SOP Instance UID its path map names: (image, patient key)."""
    import pyarrow.dataset as pads

    with open(path_map, newline="") as f:
        where = {r["key"]: r["path"] for r in csv.DictReader(f)}
    rows = pads.dataset(str(cache / "images")).to_table(columns=["path", "patient", "image", "error"]).to_pylist()
    out = {}
    for r in rows:
        if r["error"]:
            continue
        source = where[r["path"]]
        sop = pydicom.dcmread(source).SOPInstanceUID if os.path.isfile(source) else Path(source).stem
        out[sop] = (np.asarray(r["image"]), r["patient"])
    return out


def test_prepare_from_a_query_decodes_the_pixels_the_files_give(ray_cluster, archive, stored, credentials, tmp_path,
                                                                 capsys, monkeypatch):
    """A QIDO-RS query through the command line: every instance used or listed, the cache's pixels
    and patient keys those of a file-based prepare of the same files, no UID and no credential in
    the cache or the log."""
    from xray_dist.cli import app as cli

    monkeypatch.setenv("XRAY_DIST_LOG_DIR", str(tmp_path / "logs"))

    syn, labels, sop_of = stored
    salt = tmp_path / "salt"
    salt.write_text("s" * 64)
    common = ["--image-size", "32", "--seed", "3", "--salt-file", str(salt)]
    source = f"dicomweb+{archive.url}?Modality=CR"
    assert cli.main(["prepare", source, "--labels", str(labels), "--path-column", "SOPInstanceUID",
                     "--out", str(tmp_path / "web"), "--path-map", str(tmp_path / "web_map.csv"), *common]) == 0
    printed = capsys.readouterr()
    report = json.loads((tmp_path / "web" / "prepare_report.json").read_text())
    n = len(syn.files)
    assert report["ok"] == n - 1 and not report["quarantined"]
    # every instance the query found is used or listed: found (labelled) = ok + quarantined + excluded
    assert report["found"] == report["ok"] + len(report["quarantined"]) + len(report["excluded"]) == n - 1
    assert [m["reason"] for m in report["missing"]] == ["file not found"]  # the label row of no instance
    assert len(report["unlabeled"]) == 1
    assert cli.main(["prepare", str(syn.out), "--labels", str(syn.labels_csv), "--out", str(tmp_path / "files"),
                     "--redact-paths", "--path-map", str(tmp_path / "files_map.csv"), *common]) == 0
    with open(tmp_path / "web_map.csv", newline="") as f:  # where each key's instance lives: root + UIDs
        located = [r["path"] for r in csv.DictReader(f) if r["path"].endswith(".dcm")]  # (the rest: label cells)
    assert len(located) == len(sop_of) and all(p.startswith(f"dicomweb+{archive.url}/") and "?" not in p
                                               for p in located)
    web, files = _images(tmp_path / "web", tmp_path / "web_map.csv"), _images(tmp_path / "files", tmp_path / "files_map.csv")
    unlabelled = sop_of[next(iter(syn.labels))]
    assert set(web) == set(sop_of.values()) - {unlabelled}
    for sop, (image, patient) in web.items():
        np.testing.assert_array_equal(image, files[sop][0], err_msg=sop)
        assert patient == files[sop][1]
    # no UID (they can identify a study) and no credential in the cache; no credential in the log
    written = b"".join(p.read_bytes() for p in (tmp_path / "web").rglob("*") if p.is_file())
    for uid in list(sop_of.values())[:5]:
        assert uid.encode() not in written
    # the archive's cache trains like any other (a small run: one epoch, the head only)
    from xray_dist.config import TrainConfig
    from xray_dist.training.driver import train

    res = train(TrainConfig(cache=str(tmp_path / "web"), out=str(tmp_path / "run"), epochs=1, batch_size=8,
                            weights="none", unfreeze_blocks=0, num_workers=1, cpus_per_worker=0.5))
    assert res.metrics["epochs"] == 1 and res.metrics["classes"] == ["normal", "finding"]
    log_files = list((tmp_path / "logs").rglob("*.log"))
    assert log_files
    logs = b"".join(p.read_bytes() for p in log_files)
    assert b"DICOMweb: 40 instances found" in logs
    for secret in (PASSWORD, USER + ":" + PASSWORD):
        assert secret.encode() not in written and secret not in printed.out + printed.err
        assert secret.encode() not in logs


def test_wrong_credentials_or_no_archive_is_one_line_and_nothing_written(archive, stored, monkeypatch, tmp_path,
                                                                         capsys):
    from xray_dist.cli import app as cli

    _, labels, _ = stored
    monkeypatch.setenv("XRAY_DIST_DICOMWEB_USER", USER)
    monkeypatch.setenv("XRAY_DIST_DICOMWEB_PASSWORD", "not-" + PASSWORD)
    argv = ["--labels", str(labels), "--path-column", "SOPInstanceUID", "--image-size", "32"]
    assert cli.main(["prepare", f"dicomweb+{archive.url}", *argv, "--out", str(tmp_path / "c1")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HTTP 401" in err and PASSWORD not in err, err
    assert not (tmp_path / "c1").exists()
    from conftest import free_port

    assert cli.main(["prepare", f"dicomweb+http://127.0.0.1:{free_port()}/dicom-web", *argv,
                     "--out", str(tmp_path / "c2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach the archive" in err, err
    assert not (tmp_path / "c2").exists()
    assert cli.main(["prepare", f"dicomweb+http://{USER}:{PASSWORD}@127.0.0.1:{archive.port}/dicom-web", *argv,
                     "--out", str(tmp_path / "c3")]) == 2
    err = capsys.readouterr().err
    assert "never go in the URI" in err and PASSWORD not in err and not (tmp_path / "c3").exists()


def test_a_bearer_token_is_sent_and_never_written(stored, monkeypatch, tmp_path, capfd):
    """An archive behind a bearer token (Orthanc with a Lua filter that lets through only requests
    carrying ``Authorization: Bearer <token>``): prepare with XRAY_DIST_DICOMWEB_TOKEN searches and
    retrieves (the instances decoded); a wrong token is one line, exit 2, nothing written; the token
    is in no file of the cache and no line printed."""
    import secrets

    from xray_dist.cli import app as cli

    syn, _, _ = stored
    token = "tok-" + secrets.token_hex(12)
    gate = Orthanc(tmp_path / "gated", USER, PASSWORD, token=token)
    try:
        files = syn.files[:4]
        gate.client().store_instances([pydicom.dcmread(f) for f in files])
        labels = tmp_path / "labels.csv"
        with open(labels, "w", newline="") as f:
            csv.writer(f).writerows([["SOPInstanceUID", "label"]] + [
                [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID, syn.labels[str(p.relative_to(syn.out))]]
                for p in files])
        argv = ["prepare", f"dicomweb+{gate.url}", "--labels", str(labels), "--path-column", "SOPInstanceUID",
                "--image-size", "32"]
        monkeypatch.delenv("XRAY_DIST_DICOMWEB_USER", raising=False)
        monkeypatch.delenv("XRAY_DIST_DICOMWEB_PASSWORD", raising=False)
        monkeypatch.setenv("XRAY_DIST_DICOMWEB_TOKEN", "not-" + token)
        assert cli.main([*argv, "--out", str(tmp_path / "refused")]) == 2
        err = capfd.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "HTTP 403" in err and token not in err, err
        assert not (tmp_path / "refused").exists()
        monkeypatch.setenv("XRAY_DIST_DICOMWEB_TOKEN", token)
        assert cli.main([*argv, "--out", str(tmp_path / "cache")]) == 0
        report = json.loads((tmp_path / "cache" / "prepare_report.json").read_text())
        assert report["ok"] == len(files) and not report["quarantined"], report
        printed = capfd.readouterr()
        assert token not in printed.out + printed.err
        assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    finally:
        gate.stop()


def _self_signed(where: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by itself (a hospital's private CA, in small): (cert, key)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "xray-dist test archive")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = where / "ca.pem", where / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


class Gateway:
    """A gateway on 127.0.0.1 in front of the archive, as a hospital's terminates TLS (``cert``,
    ``key``: HTTPS with that certificate): each request forwarded as it came, the answer returned as
    it is; every WADO-RS retrieve held ``delay`` seconds, the most retrieves ever in flight at
    once counted (``most_at_once``), and each retrieve's answer's content coding noted
    (``encodings``: None where the instance came as stored)."""

    def __init__(self, upstream: str, cert: Path | None = None, key: Path | None = None, delay: float = 0.0):
        import ssl
        import threading
        import time
        import urllib.error
        import urllib.request
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        lock, gate = threading.Lock(), self
        self.in_flight = self.most_at_once = 0
        self.encodings: list[str | None] = []

        class Forward(BaseHTTPRequestHandler):
            def _forward(self):
                retrieve = self.command == "GET" and "/instances/" in self.path
                if retrieve:
                    with lock:
                        gate.in_flight += 1
                        gate.most_at_once = max(gate.most_at_once, gate.in_flight)
                try:
                    time.sleep(delay if retrieve else 0)
                    body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                    req = urllib.request.Request(upstream + self.path, data=body, method=self.command,
                                                 headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                    try:
                        with urllib.request.urlopen(req, timeout=60) as r:
                            status, headers, data = r.status, r.headers.items(), r.read()
                    except urllib.error.HTTPError as e:
                        status, headers, data = e.code, e.headers.items(), e.read()
                    if retrieve:
                        gate.encodings.append(dict((k.lower(), v) for k, v in headers).get("content-encoding"))
                finally:
                    if retrieve:
                        with lock:
                            gate.in_flight -= 1
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        if cert:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"{'https' if cert else 'http'}://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def test_at_most_dicomweb_connections_retrieve_at_once(archive, stored, credentials, tmp_path):
    """``--dicomweb-connections N``: the archive never sees more than N retrieves at once (counted by
    a gateway that holds each one 0.25 s, so that they overlap wherever they may): 1 with 1, and
    with 3 more than one but never more than 3, on a cluster with 4 CPUs for decode tasks. Each
    instance is asked for as stored (Orthanc would gzip it on its own CPU)."""
    from xray_dist.cli import app as cli

    syn, _, sop_of = stored
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["SOPInstanceUID", "label"]] + [[sop_of[rel], syn.labels[rel]]
                                                                  for rel in sorted(syn.labels)[:8]])
    seen = {}
    for n in (1, 3):
        gateway = Gateway(archive.url.removesuffix("/dicom-web"), delay=0.25)
        try:
            assert cli.main(["prepare", f"dicomweb+{gateway.url}", "--labels", str(labels), "--path-column",
                             "SOPInstanceUID", "--image-size", "32", "--dicomweb-connections", str(n),
                             "--out", str(tmp_path / f"cache{n}")]) == 0
        finally:
            gateway.stop()
        seen[n] = gateway.most_at_once
        # each instance handed over as stored: not gzipped on the archive's CPU (requests' default asks for it)
        assert len(gateway.encodings) == 8 and set(gateway.encodings) == {None}, gateway.encodings
    assert seen[1] == 1 and 1 < seen[3] <= 3, seen


def test_tls_is_verified_and_a_private_ca_is_named_by_its_bundle(archive, stored, credentials, monkeypatch,
                                                                 tmp_path, capfd):
    """The archive behind HTTPS with a private CA's certificate: without the CA bundle prepare stops
    with one line (TLS verification failed, naming XRAY_DIST_DICOMWEB_CA_BUNDLE), exit 2, nothing
    written; with XRAY_DIST_DICOMWEB_CA_BUNDLE it searches and retrieves every instance (in the
    driver's search and in the Ray decode tasks), a machine-wide REQUESTS_CA_BUNDLE notwithstanding."""
    from xray_dist.cli import app as cli

    _, labels, sop_of = stored
    cert, key = _self_signed(tmp_path)
    gateway = Gateway(archive.url.removesuffix("/dicom-web"), cert, key)
    try:
        argv = ["prepare", f"dicomweb+{gateway.url}", "--labels", str(labels), "--path-column", "SOPInstanceUID",
                "--image-size", "32"]
        monkeypatch.delenv("XRAY_DIST_DICOMWEB_CA_BUNDLE", raising=False)
        # a machine-wide bundle (as behind a hospital's proxy) neither admits the private CA nor,
        # below, replaces the archive's own bundle (requests would let it: the bug this test found)
        import certifi

        monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
        assert cli.main([*argv, "--out", str(tmp_path / "refused")]) == 2
        err = capfd.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "TLS verification failed" in err and \
            "XRAY_DIST_DICOMWEB_CA_BUNDLE" in err, err
        assert not (tmp_path / "refused").exists()
        monkeypatch.setenv("XRAY_DIST_DICOMWEB_CA_BUNDLE", str(cert))
        assert cli.main([*argv, "--out", str(tmp_path / "cache")]) == 0
        report = json.loads((tmp_path / "cache" / "prepare_report.json").read_text())
        assert report["ok"] == len(sop_of) - 1 and not report["quarantined"], report  # the fixture's unlabelled one
    finally:
        gateway.stop()


def test_the_search_pages_until_nothing_new(archive, stored, credentials):
    """QIDO-RS paging: small pages find what one large page finds, each instance once."""
    from xray_dist.data import dicomweb

    source, creds = dicomweb.Source.parse(f"dicomweb+{archive.url}"), dicomweb.Credentials.from_env()
    whole = dicomweb.list_instances(source, creds)
    assert len(whole) >= len(stored[2])
    assert dicomweb.list_instances(source, creds, page=7) == whole


def test_labels_by_study_label_every_instance_of_the_study(archive, stored, credentials, tmp_path):
    """``--path-column StudyInstanceUID``: one label row per study labels each of its instances; a
    study the archive lacks is listed."""
    from xray_dist.config import PrepareConfig, PreprocessSpec
    from xray_dist.data.cache import load_manifest

    syn, _, sop_of = stored
    study_label, label_of_sop = {}, {}
    for f in syn.files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        rel = str(f.relative_to(syn.out))
        study_label[ds.StudyInstanceUID] = syn.labels[rel]
        label_of_sop[ds.SOPInstanceUID] = syn.labels[rel]
    labels = tmp_path / "by_study.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["StudyInstanceUID", "label"])
        w.writerows([*study_label.items(), ["1.2.826.0.1.3680043.8.498.424242", "normal"]])
    from xray_dist.data.prepare import prepare

    report = prepare(PrepareConfig(data_dir=f"dicomweb+{archive.url}", labels=str(labels),
                                   path_column="StudyInstanceUID", out=str(tmp_path / "cache"),
                                   preprocess=PreprocessSpec(image_size=32), path_map=str(tmp_path / "map.csv")))
    assert report["ok"] == len(sop_of) and [m["reason"] for m in report["missing"]] == ["file not found"]
    with open(tmp_path / "map.csv", newline="") as f:
        sop_by_key = {r["key"]: Path(r["path"]).stem for r in csv.DictReader(f)}
    for row in load_manifest(tmp_path / "cache").to_pylist():
        assert row["label"] == label_of_sop[sop_by_key[row["path"]]]


def test_labels_by_accession_number_label_its_studies_and_no_accession_is_written(archive, stored, credentials,
                                                                                     tmp_path):
    """``--path-column AccessionNumber``: the search keeps each study's accession number (in memory),
    a label row labels every instance of its study, an accession the archive lacks is listed, and
    no accession number is in any file the prepare wrote. Files (no archive) are told to use a path."""
    from xray_dist.config import PrepareConfig, PreprocessSpec
    from xray_dist.data.cache import load_manifest
    from xray_dist.data.prepare import prepare
    from xray_dist.errors import PrepareError

    syn, _, sop_of = stored
    by_study = {}
    for d in archive.client().search_for_instances(fields=["AccessionNumber"]):  # what the archive holds
        if d.get("00080050", {}).get("Value"):  # (instances other tests store have none)
            by_study[d["0020000D"]["Value"][0]] = d["00080050"]["Value"][0]
    label_of_sop, accession_label = {}, {}
    for f in syn.files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        label_of_sop[ds.SOPInstanceUID] = syn.labels[str(f.relative_to(syn.out))]
        accession_label[by_study[ds.StudyInstanceUID]] = label_of_sop[ds.SOPInstanceUID]
    assert len(accession_label) == len({pydicom.dcmread(f).StudyInstanceUID for f in syn.files}) > 1
    labels = tmp_path / "by_accession.csv"
    unknown = "ACX999999999999"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["AccessionNumber", "label"], *accession_label.items(), [unknown, "normal"]])
    cfg = PrepareConfig(data_dir=f"dicomweb+{archive.url}", labels=str(labels), path_column="AccessionNumber",
                        out=str(tmp_path / "cache"), preprocess=PreprocessSpec(image_size=32),
                        path_map=str(tmp_path / "map.csv"))
    report = prepare(cfg)
    assert report["ok"] == len(sop_of) and [m["reason"] for m in report["missing"]] == ["file not found"]
    with open(tmp_path / "map.csv", newline="") as f:
        sop_by_key = {r["key"]: Path(r["path"]).stem for r in csv.DictReader(f)}
    for row in load_manifest(tmp_path / "cache").to_pylist():
        assert row["label"] == label_of_sop[sop_by_key[row["path"]]]
    written = b"".join(p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file())
    written += (tmp_path / "map.csv").read_bytes()  # the user's private map: UIDs, yet no accession number
    assert [a for a in [*accession_label, unknown] if a.encode() in written] == []
    with pytest.raises(PrepareError, match="AccessionNumber joins labels to a DICOMweb source"):
        prepare(PrepareConfig(data_dir=str(syn.out), labels=str(labels), path_column="AccessionNumber",
                              out=str(tmp_path / "files"), preprocess=PreprocessSpec(image_size=32)))


def test_uid_names_when_asked_and_only_for_an_archive(archive, stored, credentials, two_worker_run, tmp_path):
    """``--uid-names``: the cache, and predict's CSV, name each image STUDY/SERIES/SOP.dcm (the user's
    choice: UIDs can identify a study), the same instances the default names by keys; refused for
    files, and with --redact-paths."""
    from xray_dist.cli.app import main
    from xray_dist.data.cache import load_manifest

    syn, labels, sop_of = stored
    argv = ["prepare", f"dicomweb+{archive.url}", "--labels", str(labels), "--path-column", "SOPInstanceUID",
            "--image-size", "32"]
    assert main([*argv, "--out", str(tmp_path / "cache"), "--uid-names"]) == 0
    names = load_manifest(tmp_path / "cache").column("path").to_pylist()
    labelled = {sop_of[rel] for rel in list(syn.labels)[1:]}  # the fixture left the first file unlabelled
    assert {n.split("/")[2].removesuffix(".dcm") for n in names} == labelled
    assert all(len(n.split("/")) == 3 and all(u.replace(".dcm", "").replace(".", "").isdigit()
                                              for u in n.split("/")) for n in names)
    study = names[0].split("/")[0]
    query = f"dicomweb+{archive.url}?StudyInstanceUID={study}"  # one study: its instances
    for flags, by_uid in (([], False), (["--uid-names"], True)):
        assert main(["predict", "--model", str(two_worker_run[2]), query, "--out", str(tmp_path / "p.csv"),
                     *flags]) == 0
        with open(tmp_path / "p.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows and all(r["path"].startswith(f"{study}/") == by_uid for r in rows), rows
    assert main([*argv, "--out", str(tmp_path / "c2"), "--uid-names", "--redact-paths"]) == 2
    assert main(["prepare", str(syn.out), "--labels", str(syn.labels_csv), "--image-size", "32", "--out",
                 str(tmp_path / "c3"), "--uid-names"]) == 2


def test_predict_and_explain_name_a_query_by_keys_unless_uid_names():
    """predict/explain's naming: a query's instances by salted keys, by UIDs with --uid-names; the
    flag refused for files and beside --redact-paths."""
    import argparse

    from xray_dist.cli.common import path_names
    from xray_dist.data.paths import RELATIVE, REDACT
    from xray_dist.errors import XrayDistError

    def names(inputs, **kw):
        a = dict(inputs=inputs, redact_paths=False, path_map=None, salt_file=None, uid_names=False)
        return path_names(argparse.Namespace(**{**a, **kw}))

    query = "dicomweb+http://127.0.0.1:9/dicom-web"
    assert names([query]).policy == REDACT and names([query], uid_names=True).policy == RELATIVE
    for bad in (dict(inputs=["a.dcm"], uid_names=True), dict(inputs=[query], uid_names=True, redact_paths=True)):
        with pytest.raises(XrayDistError, match="--uid-names"):
            names(**bad)


def _store_more(archive, labels: Path, out: Path, patients: int, seed: int) -> list[str]:
    """``patients`` × 1 new instances stored in the archive and labelled; their SOP UIDs."""
    syn = synthesize(out, patients=patients, images_per_patient=1, size=64, seed=seed, encodings=("mono2_u8",))
    datasets = [pydicom.dcmread(f) for f in syn.files]
    archive.client().store_instances(datasets)
    with open(labels, "a", newline="") as f:
        csv.writer(f).writerows([d.SOPInstanceUID, syn.labels[str(p.relative_to(syn.out))]]
                                for d, p in zip(datasets, syn.files))
    return [d.SOPInstanceUID for d in datasets]


def test_a_rerun_decodes_only_new_instances_and_retries_what_an_outage_kept(archive, stored, credentials, tmp_path,
                                                                            monkeypatch):
    """Incremental: after 3 more instances arrive, a rerun of the same query decodes those 3 only.
    The archive stopped right after the search: the instances it did not hand over are quarantined
    with the reason and the ones decoded before are kept (nothing lost); once it is back, a rerun
    decodes just the quarantined ones."""
    from xray_dist.config import PrepareConfig, PreprocessSpec
    from xray_dist.data import dicomweb
    from xray_dist.data.prepare import prepare

    _, labels0, _ = stored
    labels = tmp_path / "labels.csv"
    shutil.copy(labels0, labels)
    salt = tmp_path / "salt"
    salt.write_text("t" * 64)
    cfg = PrepareConfig(data_dir=f"dicomweb+{archive.url}", labels=str(labels), path_column="SOPInstanceUID",
                        out=str(tmp_path / "cache"), preprocess=PreprocessSpec(image_size=32), salt_file=str(salt),
                        dicomweb_connections=2)
    first = prepare(cfg)
    assert first["decoded_now"] == first["ok"] > 0 and not first["quarantined"]
    assert prepare(cfg)["decoded_now"] == 0  # nothing new: nothing decoded
    _store_more(archive, labels, tmp_path / "more", 3, seed=31)
    second = prepare(cfg)
    assert second["decoded_now"] == 3 and second["ok"] == first["ok"] + 3 and not second["quarantined"]

    _store_more(archive, labels, tmp_path / "later", 2, seed=32)
    search = dicomweb.search_instances

    def search_then_outage(*a, **k):
        found = search(*a, **k)
        archive.stop()  # the archive goes down between the search and the retrieves
        return found

    monkeypatch.setattr(dicomweb, "search_instances", search_then_outage)
    try:
        third = prepare(cfg)
    finally:
        monkeypatch.setattr(dicomweb, "search_instances", search)
        if archive.proc is None:
            archive.start()
    assert third["decoded_now"] == 2 and third["ok"] == second["ok"]  # the earlier images kept
    assert len(third["quarantined"]) == 2
    assert all("could not retrieve it" in q["reason"] and "cannot reach the archive" in q["reason"]
               for q in third["quarantined"]), third["quarantined"]
    fourth = prepare(cfg)
    assert fourth["decoded_now"] == 2 and fourth["ok"] == second["ok"] + 2 and not fourth["quarantined"]
    assert prepare(cfg)["decoded_now"] == 0


def test_predict_over_a_query_scores_what_the_files_score(archive, stored, credentials, two_worker_run, tmp_path,
                                                          capsys, monkeypatch):
    """``predict`` over a DICOMweb query: one row per instance, named by a salted key (never a UID,
    in the CSV or the log), each row the probabilities ``predict`` gives the same instance's file."""
    from xray_dist.cli import app as cli

    monkeypatch.setenv("XRAY_DIST_LOG_DIR", str(tmp_path / "logs"))

    _, _, run = two_worker_run
    syn, _, sop_of = stored
    salt = tmp_path / "salt"
    salt.write_text("p" * 64)
    assert cli.main(["predict", "--model", str(run), f"dicomweb+{archive.url}?Modality=CR", "--out",
                     str(tmp_path / "web.csv"), "--salt-file", str(salt), "--path-map", str(tmp_path / "map.csv")]) == 0
    assert cli.main(["predict", "--model", str(run), str(syn.out / "images"), "--out", str(tmp_path / "files.csv")]) == 0
    with open(tmp_path / "web.csv", newline="") as f:
        web = list(csv.DictReader(f))
    with open(tmp_path / "files.csv", newline="") as f:
        by_file = {r["path"]: r for r in csv.DictReader(f)}
    with open(tmp_path / "map.csv", newline="") as f:
        sop_by_key = {r["key"]: Path(r["path"]).stem for r in csv.DictReader(f)}
    file_of_sop = {sop: rel.split("/", 1)[1] for rel, sop in sop_of.items()}
    assert len(web) >= len(sop_of) and not any(r["error"] for r in web)
    text = (tmp_path / "web.csv").read_text()
    assert not any(sop in text for sop in sop_of.values())  # UIDs can identify a study: keys only
    compared = 0
    for r in web:
        sop = sop_by_key[r["path"]]
        if sop in file_of_sop:
            twin = by_file[file_of_sop[sop]]
            assert float(r["p_finding"]) == pytest.approx(float(twin["p_finding"]), abs=1e-6)
            assert r["prediction"] == twin["prediction"]
            compared += 1
    assert compared == len(sop_of)
    # --engine ray over the same query: decode tasks retrieve with the driver's credentials (the
    # Ray workers' environment has none), the same rows come back, and no Ray log holds the secret
    import ray

    assert cli.main(["predict", "--model", str(run), f"dicomweb+{archive.url}?Modality=CR", "--out",
                     str(tmp_path / "ray.csv"), "--salt-file", str(salt), "--engine", "ray"]) == 0
    with open(tmp_path / "ray.csv", newline="") as f:
        by_ray = list(csv.DictReader(f))
    assert [r["path"] for r in by_ray] == [r["path"] for r in web] and not any(r["error"] for r in by_ray)
    for a, b in zip(web, by_ray):  # bfloat16 where the CPU has it: rounding differs with the batch's shape
        assert float(b["p_finding"]) == pytest.approx(float(a["p_finding"]), abs=5e-3)
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    ray_logs = b"".join(p.read_bytes() for p in session.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000)
    assert PASSWORD.encode() not in ray_logs
    # explain over the same query: a heatmap per instance, named by its key (the same as predict's)
    assert cli.main(["explain", "--model", str(run), f"dicomweb+{archive.url}?Modality=CR", "--out",
                     str(tmp_path / "explain"), "--salt-file", str(salt)]) == 0
    with open(tmp_path / "explain" / "explain.csv", newline="") as f:
        explained = list(csv.DictReader(f))
    assert sorted(r["path"] for r in explained) == sorted(r["path"] for r in web)
    assert not any(r["error"] for r in explained) and len(list((tmp_path / "explain").glob("*.png"))) == len(web)
    everything = "".join(p.name for p in (tmp_path / "explain").iterdir()) + (tmp_path / "explain" / "explain.csv"
                                                                              ).read_text()
    assert not any(sop in everything for sop in sop_of.values())
    assert PASSWORD not in capsys.readouterr().out
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").rglob("*.log"))
    assert not any(sop in logs for sop in sop_of.values()) and PASSWORD not in logs
