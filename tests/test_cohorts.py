"""The public chest X-ray cohorts' label formats, on tiny generated replicas with real DICOM files:
NIH ChestX-ray14, CheXpert (with -1 and blanks), RSNA Pneumonia (repeated rows), MIMIC-CXR (a
three-file join with its official split). Each prepares with the right images, findings, patients
and views, and every file ends up used or listed with its reason."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from xray_dist.config import PrepareConfig, PreprocessSpec
from xray_dist.data.prepare import prepare
from xray_dist.data.cache import load_manifest
from xray_dist.data.synth import Radiograph, write_image

pytestmark = pytest.mark.slow

SIZE = 48


@pytest.fixture(autouse=True)
def _session_ray(ray_cluster):
    """prepare on the session's Ray cluster (started by itself, it would start an embedded Ray that
    the session cluster then cannot join)."""


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def manifest_rows(cache) -> dict[str, dict]:
    m = load_manifest(cache).to_pylist()
    return {r["path"]: r for r in m}


def accounted(report: dict, n_files: int, conflicting: int = 0) -> None:
    """Every DICOM file is used, quarantined, excluded (with its reason), unlabeled, or listed as
    missing because its label rows conflict."""
    assert report["found"] == report["ok"] + len(report["quarantined"]) + len(report["excluded"])
    assert sum("conflicting" in m["reason"] for m in report["missing"]) == conflicting
    assert report["found"] + len(report["unlabeled"]) + conflicting == n_files
    assert all(e["reason"] for e in report["excluded"])


def prep(tmp_path, data, labels, name, **kw) -> dict:
    cfg = PrepareConfig(data_dir=str(data), labels=str(labels), out=str(tmp_path / name),
                        preprocess=PreprocessSpec(image_size=32), val_fraction=0.34, seed=1, **kw)
    return prepare(cfg)


# ---- NIH ChestX-ray14 --------------------------------------------------------------------------------

#: NIH patients whose Patient Age / Patient Gender differ from 50 / M (a 414: NIH's own data-entry errors)
NIH_AGE_SEX = {3: (95, "F"), 4: (7, "F"), 5: (414, "M")}


@pytest.fixture(scope="module")
def nih(tmp_path_factory):
    """6 patients × 2 images under images_001/images/*.dcm; Data_Entry_2017.csv names them .png.
    The DICOM headers all carry one placeholder Patient ID, so only the CSV's Patient ID can keep a
    patient's images together. Patient 6's second image is AP."""
    root = tmp_path_factory.mktemp("nih")
    data = root / "data"
    rng = np.random.default_rng(0)
    findings = {1: ("Effusion",), 2: ("Effusion", "Infiltration"), 3: (), 4: ("Infiltration",), 5: (),
                6: ("Effusion",)}
    index = {"Effusion": 1, "Infiltration": 2}
    rows = []
    for p, fs in findings.items():
        for i in range(2):
            view = "AP" if (p, i) == (6, 1) else "PA"
            write_image(data / "images_001" / "images" / f"{p:08d}_{i:03d}.dcm",
                        Radiograph("ANONYMOUS", tuple(index[f] for f in fs), 2, view=view), SIZE, rng)
            age, sex = NIH_AGE_SEX.get(p, (50, "M"))  # the headers' own sexes and birth dates are random
            rows.append([f"{p:08d}_{i:03d}.png", "|".join(fs) or "No Finding", i, str(p), age, sex, view])
    rows.append(["99999999_000.png", "Effusion", 0, "99", 40, "F", "PA"])  # listed, no file
    labels = write_csv(root / "Data_Entry_2017.csv", ["Image Index", "Finding Labels", "Follow-up #", "Patient ID",
                                                      "Patient Age", "Patient Gender", "View Position"], rows)
    return data, labels


def test_nih_names_findings_patients_and_views(nih, tmp_path):
    data, labels = nih
    report = prep(tmp_path, data, labels, "cache", labels_format="nih", views=("PA",))
    accounted(report, 12)
    assert report["task"] == "multilabel" and report["ok"] == 11
    assert report["classes"] == {"Effusion": 5, "Infiltration": 4, "normal": 4}
    assert report["excluded"] == [{"path": "images_001/images/00000006_001.dcm",
                                   "reason": "view AP (from the labels) not in --views PA"}]
    assert report["missing"] == [{"path": "99999999_000.png", "reason": "file not found"}]
    assert report["patients_grouped_by"] == {"labels": 11}
    rows = manifest_rows(tmp_path / "cache")
    assert rows["images_001/images/00000002_000.dcm"]["label"] == "Effusion|Infiltration"
    assert rows["images_001/images/00000003_001.dcm"]["label"] == "normal"
    by_patient = {}
    for path, r in rows.items():
        by_patient.setdefault(path.split("/")[-1][:8], set()).add((r["patient"], r["split"]))
    # the CSV's Patient ID, not the header's placeholder: 6 patients, each on one side of the split
    assert len(by_patient) == 6 and all(len(v) == 1 for v in by_patient.values())
    assert len({r["patient"] for r in rows.values()}) == 6
    assert not {str(p) for p in range(1, 7)} & {r["patient"] for r in rows.values()}  # hashed, not raw
    # subgroups: the CSV's Patient Gender and Age win over the headers' (random sexes, birth dates)
    for path, r in rows.items():
        age, sex = NIH_AGE_SEX.get(int(path.split("/")[-1][:8]), (50, "M"))
        # an impossible age in the CSV is no value: the header's stated age stands
        header_age = int(pydicom.dcmread(data / path).PatientAge[:3])
        band = {95: "90+", 7: "0-9", 50: "50-59"}.get(age, f"{header_age // 10 * 10}-{header_age // 10 * 10 + 9}")
        assert (r["sex"], r["age"]) == (sex, band), path
        assert r["view"] == "PA" and r["site"] == "site-" + r["site"][5:] and len(r["site"]) == 17
    assert report["subgroups"]["sex"] == {"F": sum(r["sex"] == "F" for r in rows.values()),
                                          "M": sum(r["sex"] == "M" for r in rows.values())}


def test_nih_without_views_keeps_every_image_and_an_official_test_list(nih, tmp_path):
    data, labels = nih
    (tmp_path / "test_list.txt").write_text("00000001_000.png\n00000001_001.png\n")
    report = prep(tmp_path, data, labels, "cache", labels_format="nih", split_files=(str(tmp_path / "test_list.txt"),))
    accounted(report, 12)
    assert report["ok"] == 12 and report["excluded"] == []
    rows = manifest_rows(tmp_path / "cache")
    assert {p for p, r in rows.items() if r["split"] == "test"} == {"images_001/images/00000001_000.dcm",
                                                                     "images_001/images/00000001_001.dcm"}


# ---- CheXpert -----------------------------------------------------------------------------------------

CHEX_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Edema", "Pleural Effusion"]


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory):
    """4 patients; the CSV's paths start with CheXpert-v1.0-small/ and end in .jpg, the data directory
    holds train/patientNNNNN/studyN/viewN_*.dcm. Patient 1's frontal image has Edema -1 (uncertain)
    and Pleural Effusion blank; patient 4 has a lateral view."""
    root = tmp_path_factory.mktemp("chexpert")
    data = root / "data"
    rng = np.random.default_rng(1)
    spec = [  # patient, study, view file, frontal/lateral, AP/PA, No Finding, Edema, Pleural Effusion
        (1, 1, "view1_frontal", "Frontal", "PA", "", "-1.0", ""),
        (1, 2, "view1_frontal", "Frontal", "PA", "", "1.0", "1.0"),
        (2, 1, "view1_frontal", "Frontal", "AP", "1.0", "0.0", "0.0"),
        (3, 1, "view1_frontal", "Frontal", "PA", "", "", "1.0"),
        (4, 1, "view1_frontal", "Frontal", "AP", "", "1.0", "-1.0"),
        (4, 1, "view2_lateral", "Lateral", "", "", "1.0", "-1.0"),
    ]
    rows = []
    for p, s, v, side, appa, none, edema, eff in spec:
        shown = tuple(i for i, cell in ((1, edema), (2, eff)) if cell == "1.0")
        write_image(data / "train" / f"patient{p:05d}" / f"study{s}" / f"{v}.dcm",
                    Radiograph(f"CXP{p}", shown, 2, view=None), SIZE, rng)  # CheXpert's view comes from its CSV
        rows.append([f"CheXpert-v1.0-small/train/patient{p:05d}/study{s}/{v}.jpg", "Male" if p == 2 else "Female",
                     60 + p, side, appa, none, edema, eff])
    labels = write_csv(root / "train.csv", CHEX_HEADER, rows)
    return data, labels


@pytest.mark.parametrize("policy, uncertain_cell", [("ignore", "?Edema"), ("zeros", "normal"), ("ones", "Edema")])
def test_chexpert_uncertainty_policies_paths_patients_and_views(chexpert, tmp_path, policy, uncertain_cell):
    data, labels = chexpert
    report = prep(tmp_path, data, labels, "cache", labels_format="chexpert", uncertain=policy, views=("PA", "AP"))
    accounted(report, 6)
    assert report["uncertain"] == policy and report["task"] == "multilabel"
    assert [e["path"] for e in report["excluded"]] == ["train/patient00004/study1/view2_lateral.dcm"]
    assert "LATERAL" in report["excluded"][0]["reason"]
    rows = manifest_rows(tmp_path / "cache")
    # the uncertain Edema (and a blank Pleural Effusion: not mentioned = absent)
    assert rows["train/patient00001/study1/view1_frontal.dcm"]["label"] == uncertain_cell
    assert rows["train/patient00001/study2/view1_frontal.dcm"]["label"] == "Edema|Pleural Effusion"
    assert rows["train/patient00002/study1/view1_frontal.dcm"]["label"] == "normal"
    # subgroups from the CSV's Sex and Age (patient 2 male, 62; the others female, 61-64), views from AP/PA
    assert {p: (r["sex"], r["age"], r["view"]) for p, r in rows.items()} == {
        f"train/patient0000{p}/study{s}/view1_frontal.dcm": ("M" if p == 2 else "F", "60-69", v)
        for p, s, v in ((1, 1, "PA"), (1, 2, "PA"), (2, 1, "AP"), (3, 1, "PA"), (4, 1, "AP"))}
    four = {"ignore": "Edema|?Pleural Effusion", "zeros": "Edema", "ones": "Edema|Pleural Effusion"}[policy]
    assert rows["train/patient00004/study1/view1_frontal.dcm"]["label"] == four
    assert report["patients_grouped_by"] == {"labels": 5}
    p1 = {r["patient"] for p, r in rows.items() if "patient00001" in p}
    assert len(p1) == 1 and len({r["patient"] for r in rows.values()}) == 4  # from the path's patientNNNNN


def test_chexpert_uncertain_targets_follow_the_policy(chexpert, tmp_path):
    """What training sees: -1 (masked) under ignore, 0 under zeros, 1 under ones."""
    from xray_dist.data.classes import build_multilabel_scheme

    data, labels = chexpert
    got = {}
    for policy in ("ignore", "zeros", "ones"):
        prep(tmp_path, data, labels, policy, labels_format="chexpert", uncertain=policy)
        rows = manifest_rows(tmp_path / policy)
        scheme = build_multilabel_scheme([r["label"] for r in rows.values()], None)
        t = scheme.target(rows["train/patient00001/study1/view1_frontal.dcm"]["label"])
        got[policy] = dict(zip([*scheme.names, "any"], t.tolist()))
    assert got["ignore"] == {"Edema": -1, "Pleural Effusion": 0, "any": -1}
    assert got["zeros"] == {"Edema": 0, "Pleural Effusion": 0, "any": 0}
    assert got["ones"] == {"Edema": 1, "Pleural Effusion": 0, "any": 1}


# ---- RSNA Pneumonia -----------------------------------------------------------------------------------

def test_rsna_repeated_rows_and_header_views(tmp_path):
    """One row per box (several per patientId); Target 1 → pneumonia. Views come from the DICOM
    headers: an AP image and one without View Position are excluded with their reasons."""
    data = tmp_path / "data" / "stage_2_train_images"
    rng = np.random.default_rng(2)
    ids = [f"{i:04x}cfab-14fd-4e49-80ba-63a80b6bd{i:03d}" for i in range(6)]
    views = ["PA", "PA", "PA", "PA", "AP", None]
    for pid, view, target in zip(ids, views, [1, 0, 1, 0, 1, 0]):
        write_image(data / f"{pid}.dcm", Radiograph(pid, (1,) if target else (), 1, view=view), SIZE, rng)
    rows = []
    for pid, target in zip(ids, [1, 0, 1, 0, 1, 0]):
        rows += [[pid, 10, 20, 30, 40, 1]] * 2 if target else [[pid, "", "", "", "", 0]]
    rows.append([ids[3], 1, 2, 3, 4, 1])  # a conflicting row: that file is listed, not guessed
    labels = write_csv(tmp_path / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"],
                       rows)
    report = prep(tmp_path, tmp_path / "data", labels, "cache", labels_format="rsna", views=("PA",))
    accounted(report, 6, conflicting=1)
    assert report["task"] == "multiclass" and report["classes"] == {"normal": 1, "pneumonia": 2}
    assert report["missing"] == [{"path": f"stage_2_train_images/{ids[3]}.dcm",
                                  "reason": "conflicting labels in the CSV; not used"}]
    reasons = {e["path"].split("/")[-1][:4]: e["reason"] for e in report["excluded"]}
    assert reasons == {"0004": "view AP (from the DICOM header) not in --views PA",
                       "0005": "no view: no View Position (0018,5101) in the header and none in the labels"}
    assert report["patients_grouped_by"] == {"labels": 3}


# ---- MIMIC-CXR ----------------------------------------------------------------------------------------

def test_mimic_join_and_official_split(tmp_path):
    """Labels per study, files per dicom_id, joined through the metadata CSV; the official split CSV
    (train / validate / test) is honoured; a study without a label row is listed."""
    data = tmp_path / "data"
    rng = np.random.default_rng(3)
    studies = {(10000032, 50414267): ("1.0", ""), (10000032, 53189527): ("", "-1.0"),
               (10000764, 57375967): ("0.0", "1.0"), (10000898, 50771383): ("", ""),
               (10001122, 59999999): None}  # no label row
    split_of = {10000032: "train", 10000764: "validate", 10000898: "test", 10001122: "train"}
    meta, split_rows, label_rows = [], [], []
    for n, ((subject, study), cells) in enumerate(studies.items()):
        for k, view in enumerate(("PA", "LATERAL")):
            dicom_id = f"{n:02d}{k}e1b8a-2c1d3f4e-5a6b7c8d-9e0f1a2b"
            shown = () if cells is None else tuple(i + 1 for i, c in enumerate(cells) if c == "1.0")
            write_image(data / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id}.dcm",
                        Radiograph("ANONYMOUS", shown, 2, view=None), SIZE, rng)
            meta.append([dicom_id, subject, study, "CHEST (PA AND LAT)", view, f"{2180 + n}0512"])
            split_rows.append([dicom_id, study, subject, split_of[subject]])
        if cells is not None:
            label_rows.append([subject, study, *cells, "1.0" if not any(c == "1.0" for c in cells) else ""])
    labels = write_csv(tmp_path / "mimic-cxr-2.0.0-chexpert.csv",
                       ["subject_id", "study_id", "Atelectasis", "Cardiomegaly", "No Finding"], label_rows)
    metadata = write_csv(tmp_path / "mimic-cxr-2.0.0-metadata.csv",
                         ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                          "StudyDate"], meta)
    # MIMIC-IV's patients.csv: anchor_age in anchor_year (the shifted calendar StudyDate shares);
    # 10000898 has no row: its sex and age come from the DICOM header
    people = {10000032: ("F", 52, 2180), 10000764: ("M", 88, 2180), 10001122: ("F", 30, 2182)}
    patients = write_csv(tmp_path / "patients.csv", ["subject_id", "gender", "anchor_age", "anchor_year", "dod"],
                         [[k, g, a, y, ""] for k, (g, a, y) in people.items()])
    split = write_csv(tmp_path / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"],
                      split_rows)
    report = prep(tmp_path, data, labels, "cache", labels_format="mimic", metadata=str(metadata),
                  split_files=(str(split),), views=("PA", "AP"), uncertain="zeros", mimic_patients=str(patients))
    accounted(report, 10)
    assert report["ok"] == 4 and len(report["excluded"]) == 4  # laterals
    assert [m["reason"] for m in report["missing"]] == ["study 59999999: no row in the labels CSV"] * 2
    rows = manifest_rows(tmp_path / "cache")
    got = {p.split("/")[3]: (r["label"], r["split"]) for p, r in rows.items()}
    assert got == {"s50414267": ("Atelectasis", "train"), "s53189527": ("normal", "train"),
                   "s57375967": ("Cardiomegaly", "val"), "s50771383": ("normal", "test")}
    keys = Counter(r["patient"] for r in rows.values())
    assert sorted(keys.values()) == [1, 1, 2]  # subject_id is the patient: two studies, one patient
    # sex and the age at each study: anchor_age + (study year - anchor_year); study n is in 2180 + n
    study_n = {f"s{study}": n for n, (_, study) in enumerate(studies)}
    for path, r in rows.items():
        subject, n = int(path.split("/")[2][1:]), study_n[path.split("/")[3]]
        if subject in people:
            sex, age, year = people[subject]
            years = age + 2180 + n - year
            band = "90+" if years >= 90 else f"{years // 10 * 10}-{years // 10 * 10 + 9}"
            assert (r["sex"], r["age"]) == (sex, band), (path, years)
        else:
            header = pydicom.dcmread(data / path)
            assert r["sex"] == (header.get("PatientSex") or "unknown"), path


def test_cli_flags_reach_prepare(nih, tmp_path, capsys):
    """--labels-format and --views through the command line; the summary says what was excluded."""
    from xray_dist.cli import app as cli

    data, labels = nih
    rc = cli.main(["prepare", str(data), "--labels", str(labels), "--labels-format", "nih", "--views", "pa",
                   "--image-size", "32", "--out", str(tmp_path / "cache"), "--val-fraction", "0.34"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "11 of 12 files used" in out and "1 excluded by view" in out and "findings (images): Effusion=5" in out
