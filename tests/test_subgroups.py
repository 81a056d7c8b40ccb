"""Subgroups (#23): attributes captured at prepare (never an identifier), and ``evaluate --by``
finding a gap built into the data, with intervals from one patient-level bootstrap."""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections import Counter

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from xray_dist.data import subgroups as attrs
from xray_dist.data.cache import load_manifest
from xray_dist.data.synth import SITES, STUDY_DATE, synthesize
from xray_dist.results.subgroups import subgroup_metrics


@pytest.mark.parametrize("value, band", [("045Y", "40-49"), ("006M", "0-9"), ("010W", "0-9"), ("003D", "0-9"),
                                         ("090Y", "90+"), ("089Y", "80-89"), ("117Y", "90+"), ("414", "unknown"),
                                         ("", "unknown"), ("4O5Y", "unknown"), ("19", "10-19")])
def test_dicom_and_labels_ages_become_10_year_bands(value, band):
    assert attrs.age_band(attrs.age_years(value)) == band


def test_the_header_gives_attributes_never_a_name_or_a_date():
    ds = Dataset()
    ds.PatientSex, ds.PatientBirthDate, ds.StudyDate = "f", "19500612", "20240115"  # no Patient's Age: dates
    ds.InstitutionName, ds.Manufacturer, ds.ManufacturerModelName = "St Smith Hospital", "Acme\nImaging", "CR-1"
    got = attrs.from_header(ds, "salt-a")
    assert got == {"sex": "F", "age": "70-79", "view": "", "manufacturer": "Acme Imaging", "model": "CR-1",
                   "site": attrs.site_key("salt-a", "St Smith Hospital")}
    assert "Smith" not in json.dumps(got) and "1950" not in json.dumps(got)
    assert attrs.site_key("salt-b", "St Smith Hospital") != got["site"]  # keyed: another salt, another key
    assert attrs.from_header(Dataset(), "s") == {"sex": "unknown", "age": "unknown", "view": "",
                                                 "manufacturer": "unknown", "model": "unknown", "site": "unknown"}
    ds.PatientAge = "034Y"  # the stated age wins over the dates
    assert attrs.from_header(ds, "salt-a")["age"] == "30-39"


def _cohort(rng, patients: int, auc_a_noise: float, auc_b_noise: float):
    """Two images per patient, half the patients abnormal; group a's scores separate the classes
    with noise ``auc_a_noise``, group b's with ``auc_b_noise`` (ground truth the test holds)."""
    pid = np.repeat(np.arange(patients), 2)
    truth = np.repeat(np.arange(patients) % 2, 2)
    group = np.where(np.repeat(np.arange(patients) // 2 % 2, 2) == 0, "a", "b")  # not the class
    noise = np.where(group == "a", auc_a_noise, auc_b_noise)
    score = 1 / (1 + np.exp(-(truth * 2 - 1 + rng.normal(0, 1, len(truth)) * noise)))
    probs = np.stack([1 - score, score], axis=1)
    return pid.astype(str), truth, group, probs


def _pairwise_auroc(y, s) -> float:
    """AUROC by counting every (positive, negative) pair: the test's own ground truth."""
    pos, neg = s[y == 1], s[y == 0]
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def test_a_built_in_gap_is_found_and_an_absent_one_is_not():
    rng = np.random.default_rng(0)
    pid, truth, group, probs = _cohort(rng, 80, 0.2, 3.0)  # a: near perfect; b: little better than chance
    res = subgroup_metrics({"site": group}, truth, probs, pid, ["finding"], 0.5, False, n_boot=300)["site"]
    by = {g["value"]: g for g in res["groups"]}
    for v in "ab":
        rows = group == v
        assert by[v]["auc_abnormal"]["value"] == pytest.approx(_pairwise_auroc(truth[rows], probs[rows, 1]))
        assert by[v]["patients"] == 40 and by[v]["images"] == 80 and by[v]["prevalence"] == 0.5
        lo, hi = by[v]["auc_abnormal"]["ci95"]
        assert lo <= by[v]["auc_abnormal"]["value"] <= hi
    gap = res["gaps"]["auc_abnormal"]
    assert gap["between"] == ["a", "b"]
    assert gap["value"] == pytest.approx(by["a"]["auc_abnormal"]["value"] - by["b"]["auc_abnormal"]["value"])
    assert gap["ci95"][0] > 0, gap  # large and real: the interval excludes 0
    assert "sensitivity" in res["gaps"]

    pid, truth, group, probs = _cohort(np.random.default_rng(1), 80, 1.0, 1.0)  # the same in both groups
    gap = subgroup_metrics({"site": group}, truth, probs, pid, ["finding"], 0.5, False, n_boot=300)["site"]["gaps"]
    assert gap["auc_abnormal"]["ci95"][0] < 0 < gap["auc_abnormal"]["ci95"][1], gap


def test_small_subgroups_are_listed_without_numbers():
    pid, truth, group, probs = _cohort(np.random.default_rng(2), 40, 1.0, 1.0)
    group = np.where(pid.astype(int) < 6, "rare", "common")  # 6 patients
    res = subgroup_metrics({"view": group}, truth, probs, pid, ["finding"], 0.5, False, n_boot=200,
                           min_patients=10)["view"]
    rare = next(g for g in res["groups"] if g["value"] == "rare")
    assert rare == {"value": "rare", "images": 12, "patients": 6, "prevalence": 0.5,
                    "skipped": "fewer than 10 patients (--min-patients)"}
    assert res["gaps"] == {}  # one group with numbers: no gap to draw
    tied = subgroup_metrics({"site": np.where(pid.astype(int) % 3 == 0, "x", "y")}, truth, np.stack([1 - truth, truth], 1),
                            pid, ["finding"], 0.5, False, n_boot=100)["site"]["gaps"]["auc_abnormal"]
    assert sorted(tied["between"]) == ["x", "y"] and tied["value"] == 0 == tied["ci95"][0] == tied["ci95"][1]


@pytest.mark.slow
def test_prepare_records_each_images_attributes_from_its_header(ray_cluster, tmp_path):
    from xray_dist.config import PrepareConfig, PreprocessSpec
    from xray_dist.data.prepare import prepare

    syn = synthesize(tmp_path / "data", patients=12, images_per_patient=1, size=48, seed=5, sites=3)
    salt = tmp_path / "keys" / "salt"
    report = prepare(PrepareConfig(data_dir=str(syn.out), labels=str(syn.labels_csv), out=str(tmp_path / "cache"),
                                   preprocess=PreprocessSpec(image_size=32), salt_file=str(salt)))
    rows = {r["path"]: r for r in load_manifest(tmp_path / "cache").to_pylist()}
    site_keys = {}
    for rel, site in syn.sites.items():
        ds = pydicom.dcmread(syn.out / rel)
        born = dt.datetime.strptime(ds.PatientBirthDate, "%Y%m%d").date()
        years = (STUDY_DATE - born).days / 365.25
        r = rows[rel]
        assert r["sex"] == ds.PatientSex and r["view"] == "PA"
        assert r["age"] == ("90+" if years >= 90 else f"{int(years) // 10 * 10}-{int(years) // 10 * 10 + 9}")
        assert (r["manufacturer"], r["model"]) == SITES[site][1:]
        site_keys.setdefault(site, set()).add(r["site"])
    assert all(len(k) == 1 for k in site_keys.values()) and len(set.union(*site_keys.values())) == 3
    assert report["subgroups"]["site"] == dict(Counter(r["site"] for r in rows.values()))
    assert report["subgroups"]["sex"] == dict(sorted(Counter(r["sex"] for r in rows.values()).items()))
    written = b"".join(f.read_bytes() for f in (tmp_path / "cache").rglob("*") if f.is_file())
    for name, *_ in SITES:  # the institution's name is never written, only its salted key
        assert name.encode() not in written and name.split()[1].encode() not in written

    # --site-column: the labels name the site (here against the headers: the labels win)
    labels = tmp_path / "labels_site.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "hospital"),
                                 *[(rel, syn.labels[rel], f"H{(i % 2) + 1}") for i, rel in enumerate(syn.labels)]])
    prepare(PrepareConfig(data_dir=str(syn.out), labels=str(labels), out=str(tmp_path / "cache2"),
                          preprocess=PreprocessSpec(image_size=32), salt_file=str(salt), site_column="hospital"))
    rows = {r["path"]: r for r in load_manifest(tmp_path / "cache2").to_pylist()}
    assert {rel: rows[rel]["site"] for rel in syn.labels} == {rel: f"H{(i % 2) + 1}" for i, rel in enumerate(syn.labels)}


@pytest.fixture(scope="module")
def two_sites(ray_cluster, tmp_path_factory):
    """Two hospitals; in the second the finding has 10 % of its contrast. A run trained on both:
    (cache, run, the subtle site's key)."""
    from xray_dist.config import PrepareConfig, PreprocessSpec, TrainConfig
    from xray_dist.data.prepare import prepare
    from xray_dist.training.driver import train

    root = tmp_path_factory.mktemp("two_sites")
    syn = synthesize(root / "data", patients=96, images_per_patient=2, size=64, seed=7, sites=2, subtle_site=1,
                     subtle_strength=0.1)
    prepare(PrepareConfig(data_dir=str(syn.out), labels=str(syn.labels_csv), out=str(root / "cache"),
                          preprocess=PreprocessSpec(image_size=32), val_fraction=0.2, test_fraction=0.4, seed=1))
    train(TrainConfig(cache=str(root / "cache"), out=str(root / "run"), epochs=5, batch_size=8, lr=1e-4,
                      weights="none", unfreeze_blocks=5, runner="inprocess"))  # a model to audit: no Ray Train
    rows = {r["path"]: r for r in load_manifest(root / "cache").to_pylist()}
    subtle = {rows[rel]["site"] for rel, s in syn.sites.items() if s == 1}
    assert len(subtle) == 1
    return root / "cache", root / "run", subtle.pop()


@pytest.mark.slow
def test_evaluate_by_site_finds_the_built_in_gap(two_sites, tmp_path, capsys):
    from xray_dist.cli import app as cli
    from xray_dist.results.report import write_report

    cache, run, subtle = two_sites
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--model", str(run), "--cache", str(cache), "--out", str(out), "--by", "site,sex",
                     "--bootstrap", "500", "--min-patients", "5"]) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    site = m["subgroups"]["site"]
    by = {g["value"]: g for g in site["groups"]}
    assert subtle in by and len(by) == 2
    gap = site["gaps"]["auc_abnormal"]
    assert gap["between"][1] == subtle, gap  # the subtle site is the worse one
    assert gap["ci95"][0] > 0, gap  # and the data support the gap
    assert "largest AUROC gap" in printed and "by site: 2 subgroups" in printed
    assert set(m["subgroups"]) == {"site", "sex"}
    with open(out / "subgroups.csv", newline="") as f:
        table = list(csv.DictReader(f))
    est = {(r["attribute"], r["value"], r["metric"]): float(r["estimate"]) for r in table if r["estimate"]}
    assert est[("site", subtle, "auc_abnormal")] == pytest.approx(by[subtle]["auc_abnormal"]["value"])
    assert (out / "subgroups.png").stat().st_size > 1000
    # the run's own evaluation (RUN/evaluation/test), which the report shows
    assert cli.main(["evaluate", "--model", str(run), "--cache", str(cache), "--by", "site", "--bootstrap", "200",
                     "--min-patients", "5"]) == 0
    html = write_report(run, tmp_path / "r.html").read_text()
    assert "By subgroup" in html and subtle in html
    assert cli.main(["evaluate", "--model", str(run), "--cache", str(cache), "--by", "height"]) == 2
    assert "--by height: expected some of sex,age,view,manufacturer,model,site" in capsys.readouterr().err


@pytest.mark.slow
def test_the_model_card_holds_every_section_and_no_path_or_key(two_sites, tmp_path, capsys):
    """report writes MODEL_CARD.md beside the HTML: every section, the counts the manifest holds,
    the limitations it can detect, and no file name, directory or patient key."""
    import shutil

    from xray_dist.cli import app as cli
    from xray_dist.data import fingerprint
    from xray_dist.results.model_card import PLACEHOLDER

    cache, shared_run, _ = two_sites
    run = tmp_path / "run"  # a copy: calibrate rewrites the spec
    shutil.copytree(shared_run, run)
    assert cli.main(["calibrate", "--model", str(run)]) == 0
    assert cli.main(["evaluate", "--model", str(run), "--cache", str(cache), "--by", "site,sex,age",
                     "--bootstrap", "100", "--min-patients", "8"]) == 0
    use = "Research only: triage of synthetic chest films, never a diagnosis."
    assert cli.main(["report", str(run), "--out", str(tmp_path / "out" / "report.html"), "--bootstrap", "50",
                     "--intended-use", use]) == 0
    assert "model card:" in capsys.readouterr().out
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    sections = [line[3:] for line in card.splitlines() if line.startswith("## ")]
    assert sections == ["Intended use", "Model", "Training data", "Held-out results", "Subgroups",
                        "External validation", "Calibration", "Known limitations", "Software and data version"]
    assert use in card and PLACEHOLDER not in card
    manifest = load_manifest(cache).to_pylist()
    assert f"| images used | {len(manifest)} |" in card
    for sex, n in Counter(r["sex"] for r in manifest).items():
        assert f"{sex} {n} (" in card, sex
    ev = json.loads((run / "evaluation" / "test" / "metrics.json").read_text())
    assert f"{ev['auc_abnormal']['value']:.3f} [{ev['auc_abnormal']['ci95'][0]:.3f}" in card
    skipped = [g["value"] for g in ev["subgroups"]["age"]["groups"] if "skipped" in g]
    assert skipped, "the test wants an age band under --min-patients"
    assert "Subgroups of age with too few patients" in card and "No external validation" in card
    assert "not initialised with ImageNet" in card and "Not calibrated" not in card
    assert "ECE (held out)" in card and fingerprint.recorded(str(run))["id"] in card
    import tensorflow as tf

    assert f"| tensorflow | {tf.__version__} |" in card
    # no file name, directory or patient key
    for r in manifest:
        assert r["path"] not in card and r["patient"] not in card, r["path"]
        assert r["path"].rsplit("/", 1)[-1] not in card
    assert str(tmp_path) not in card and str(cache) not in card and "/tmp" not in card
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<h2>Model card</h2>" in html and html.count("<h3>Known limitations</h3>") == 1
    # without --intended-use the card says it was not stated; without calibration it says so
    shutil.rmtree(run)
    shutil.copytree(shared_run, run)
    shutil.rmtree(run / "evaluation", ignore_errors=True)  # another test may have evaluated the shared run
    assert cli.main(["report", str(run), "--out", str(tmp_path / "plain" / "r.html"), "--bootstrap", "50"]) == 0
    plain = (tmp_path / "plain" / "MODEL_CARD.md").read_text()
    assert PLACEHOLDER in plain and "Not calibrated" in plain and "No held-out test evaluation" in plain


def test_the_model_card_never_names_a_weights_file():
    """``--weights PATH`` is stored as the file's path, which can carry a name: the card says only
    that a file was used."""
    from xray_dist.results.model_card import build

    secret = "/home/SMITH_JOHN_MRN0042/vgg16_notop.h5"
    card = build({"config": {"weights": secret, "image_size": 32}, "classes": ["normal", "finding"]}, {}, None, [],
                 None, None)
    text = card.markdown("Model card") + card.html()
    assert "SMITH" not in text and "/home" not in text and "a weights file" in text
