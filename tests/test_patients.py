"""Patients, truthfully: what each patient key was made from, a placeholder ID that swallows the
cohort, patients named by the labels CSV, and a class the training split never sees."""

from __future__ import annotations

import csv
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest

from xray_dist.data.patients import BY_FILE, BY_PATIENT_ID, BY_STUDY_UID, hash_patient, patient_key_and_source


class TestKeySource:
    def test_patient_id_then_study_then_file(self, synth_binary):
        ds = pydicom.dcmread(synth_binary.files[0])
        key, source = patient_key_and_source(ds, "s", "f")
        assert source == BY_PATIENT_ID and key == hash_patient("s", "pid:" + ds.PatientID)
        ds.PatientID = ""
        assert patient_key_and_source(ds, "s", "f") == (hash_patient("s", "study:" + ds.StudyInstanceUID),
                                                        BY_STUDY_UID)
        ds.StudyInstanceUID = ""
        assert patient_key_and_source(ds, "s", "f") == (hash_patient("s", "file:f"), BY_FILE)


def test_a_class_only_outside_train_is_a_clear_error(tmp_path):
    """Validation holds a label that training never saw: a CacheError naming the class, not a KeyError."""
    from xray_dist.data.classes import build_scheme
    from xray_dist.errors import CacheError
    from xray_dist.data.cache import split_labels

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "_COMPLETE.json").write_text("{}")
    pq.write_table(pa.table({"path": ["a", "b", "c"], "split": ["train", "train", "val"],
                             "label": ["normal", "finding", "effusion"], "patient": ["1", "2", "3"]}),
                   tmp_path / "manifest.parquet")
    scheme = build_scheme({"normal": 1, "finding": 1}, None, "normal")
    assert split_labels(tmp_path, "train", scheme) == {"a": 0, "b": 1}
    with pytest.raises(CacheError, match="class 'effusion' has 1 images in the 'val' split but none in 'train'"):
        split_labels(tmp_path, "val", scheme)


@pytest.mark.slow
def test_prepare_reports_grouping_warns_on_placeholders_and_takes_csv_patients(ray_cluster, synth_binary, tmp_path,
                                                                             caplog):
    """A third of the files carry the placeholder Patient ID ANONYMOUS, four have no IDs at all:
    prepare says how every key was made and warns about the placeholder; with --patient-column the
    labels' patients make the keys, and files sharing a CSV patient share a key."""
    import logging

    from xray_dist.cli.app import main

    data = tmp_path / "data"
    shutil.copytree(synth_binary.out, data)
    files = sorted(synth_binary.labels)
    anonymous, no_ids = files[: len(files) // 3], files[-4:]
    for rel in anonymous + no_ids:
        ds = pydicom.dcmread(data / rel)
        ds.PatientID = "ANONYMOUS" if rel in anonymous else ""
        if rel in no_ids:
            ds.StudyInstanceUID = ""
        ds.save_as(data / rel)
    with caplog.at_level(logging.WARNING):
        assert main(["prepare", str(data), "--labels", str(data / "labels.csv"), "--out", str(tmp_path / "c1"),
                     "--image-size", "32"]) == 0
    report = json.loads((tmp_path / "c1" / "prepare_report.json").read_text())
    assert report["patients_grouped_by"] == {"file": 4, "patient_id": len(files) - 4}
    assert any(f"{len(anonymous)} of {len(files)} files" in w and "placeholder" in w for w in report["warnings"])
    assert any("placeholder" in r.getMessage() for r in caplog.records)

    # the labels CSV knows the patients (the true ones synth used, under another column name)
    with open(data / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(data / "labels_p.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "subject"])
        for r in rows:
            w.writerow([r["path"], r["label"], synth_binary.patients[r["path"]]])
    assert main(["prepare", str(data), "--labels", str(data / "labels_p.csv"), "--patient-column", "subject",
                 "--out", str(tmp_path / "c2"), "--image-size", "32"]) == 0
    report = json.loads((tmp_path / "c2" / "prepare_report.json").read_text())
    assert report["patients_grouped_by"] == {"labels": len(files)} and not report["warnings"]
    m = pq.read_table(tmp_path / "c2" / "manifest.parquet").to_pylist()
    key_of = {r["path"]: r["patient"] for r in m}
    true = synth_binary.patients
    assert len(set(key_of.values())) == len(set(true.values()))
    for a in files:  # equal keys exactly for files of one true patient, none of them in two splits
        for b in files:
            assert (key_of[a] == key_of[b]) == (true[a] == true[b])
    split_of = {}
    for r in m:
        assert split_of.setdefault(true[r["path"]], r["split"]) == r["split"]
    assert not set(key_of.values()) & set(true.values())  # keys, never the raw IDs

    # the salt kept apart from the cache: the keys are those of that salt, and the cache holds none
    salt_file = tmp_path / "secret" / "salt"
    assert main(["prepare", str(data), "--labels", str(data / "labels_p.csv"), "--patient-column", "subject",
                 "--salt-file", str(salt_file), "--out", str(tmp_path / "c3"), "--image-size", "32"]) == 0
    salt = salt_file.read_text().strip()
    assert len(salt) >= 32 and oct(salt_file.stat().st_mode & 0o777) == "0o600"
    assert not (tmp_path / "c3" / ".salt").exists()
    m3 = {r["path"]: r["patient"] for r in pq.read_table(tmp_path / "c3" / "manifest.parquet").to_pylist()}
    assert m3 == {rel: hash_patient(salt, "labels:" + true[rel]) for rel in files}


class TestSplitFile:
    """``prepare --split-file``: official splits reproduced exactly, conflicts refused."""

    @staticmethod
    def prepare(synth_binary, out, *split_files, **kw):
        from xray_dist.config import PrepareConfig, PreprocessSpec
        from xray_dist.data.prepare import prepare

        report = prepare(PrepareConfig(data_dir=str(synth_binary.out), labels=str(synth_binary.labels_csv),
                                       out=str(out), preprocess=PreprocessSpec(image_size=32),
                                       split_files=tuple(map(str, split_files)), **kw))
        m = pq.read_table(out / "manifest.parquet").to_pylist()
        return report, {r["path"]: r["split"] for r in m}

    @staticmethod
    def patients(synth_binary) -> list[str]:
        return sorted(set(synth_binary.patients.values()))

    @pytest.mark.slow
    def test_a_csv_by_path_or_by_patient_is_reproduced_exactly(self, ray_cluster, synth_binary, tmp_path):
        pids = self.patients(synth_binary)
        wanted = {pid: ("test" if i % 4 == 0 else "val" if i % 4 == 1 else "train") for i, pid in enumerate(pids)}
        by_path = tmp_path / "split_by_path.csv"
        with open(by_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "split"])
            w.writerows((rel, wanted[pid]) for rel, pid in synth_binary.patients.items())
        report, split = self.prepare(synth_binary, tmp_path / "c1", by_path, seed=1)
        assert split == {rel: wanted[pid] for rel, pid in synth_binary.patients.items()}
        assert report["split_settings"]["how"] == "split file" and report["split_settings"]["drawn_patients"] == 0
        by_patient = tmp_path / "split_by_patient.csv"
        with open(by_patient, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["patient", "split"])
            w.writerows(wanted.items())
        _, split2 = self.prepare(synth_binary, tmp_path / "c2", by_patient, seed=7)  # seed plays no part
        assert split2 == split

    @pytest.mark.slow
    def test_name_lists_fix_test_and_draw_validation_from_the_rest(self, ray_cluster, synth_binary, tmp_path):
        pids = self.patients(synth_binary)
        test_pids = set(pids[::5])
        names = sorted(rel.split("/")[-1] for rel, pid in synth_binary.patients.items() if pid in test_pids)
        (tmp_path / "test_list.txt").write_text("\n".join(names) + "\n")
        report, split = self.prepare(synth_binary, tmp_path / "c", tmp_path / "test_list.txt", val_fraction=0.25)
        for rel, pid in synth_binary.patients.items():
            assert (split[rel] == "test") == (pid in test_pids)
        sides: dict[str, set] = {}
        for rel, pid in synth_binary.patients.items():
            sides.setdefault(pid, set()).add(split[rel])
        assert all(len(s) == 1 for s in sides.values())  # no patient on two sides
        assert {"train", "val"} <= set(split.values())
        assert report["split_settings"]["drawn_patients"] == len(pids) - len(test_pids)

    @pytest.mark.slow
    def test_a_patient_put_in_two_splits_is_refused_with_their_files_named(self, ray_cluster, synth_binary, tmp_path,
                                                                        capsys):
        from xray_dist.cli import app as cli

        rel_a, rel_b = sorted(r for r, pid in synth_binary.patients.items()
                              if pid == self.patients(synth_binary)[3])[:2]
        bad = tmp_path / "split.csv"
        bad.write_text(f"path,split\n{rel_a},train\n{rel_b},test\n")
        code = cli.main(["prepare", str(synth_binary.out), "--labels", str(synth_binary.labels_csv), "--out",
                         str(tmp_path / "c"), "--image-size", "32", "--split-file", str(bad)])
        err = capsys.readouterr().err
        assert code == 2 and "two splits" in err and rel_a in err and rel_b in err
        assert "Traceback" not in err and synth_binary.patients[rel_a] not in err  # the raw ID stays private


def test_split_files_are_read_strictly(tmp_path):
    from xray_dist.errors import PrepareError
    from xray_dist.data.splits import read_split_files

    (tmp_path / "train_val_list.txt").write_text("a.png\nb.png\n")
    (tmp_path / "test_list.txt").write_text("c.png\n")
    sf = read_split_files([str(tmp_path / "train_val_list.txt"), str(tmp_path / "test_list.txt")])
    assert sf.of_file("images/a.dcm") == "train_val" and sf.of_file("c.png") == "test" and sf.of_file("d") is None
    (tmp_path / "mine.txt").write_text("a.png\n")
    with pytest.raises(PrepareError, match="say its split in its name"):
        read_split_files([str(tmp_path / "mine.txt")])
    (tmp_path / "s.csv").write_text("path,split\na.png,holdout\n")
    with pytest.raises(PrepareError, match="holdout"):
        read_split_files([str(tmp_path / "s.csv")])
    with pytest.raises(PrepareError, match="nope_test_list.txt: no such file"):
        read_split_files([str(tmp_path / "nope_test_list.txt")])
    (tmp_path / "both_test_list.txt").write_text("a.png\n")
    with pytest.raises(PrepareError, match="two splits"):
        read_split_files([str(tmp_path / "train_val_list.txt"), str(tmp_path / "both_test_list.txt")])


@pytest.mark.slow
def test_no_true_patient_on_two_sides(prepared_binary, synth_binary):
    """Leakage checked against the patient IDs synth wrote (not against the product's own keys):
    no true patient in two splits, one key per true patient, one patient per key."""
    _, cache = prepared_binary
    m = pq.read_table(cache / "manifest.parquet").to_pylist()
    true = synth_binary.patients  # relative path -> the Patient ID in the file
    assert {r["path"] for r in m} == set(true)
    sides: dict[str, set] = {}
    keys: dict[str, set] = {}
    for r in m:
        sides.setdefault(true[r["path"]], set()).add(r["split"])
        keys.setdefault(true[r["path"]], set()).add(r["patient"])
    assert all(len(s) == 1 for s in sides.values()), "a patient on two sides"
    assert all(len(k) == 1 for k in keys.values()), "two files of one patient under two keys"
    assert len({r["patient"] for r in m}) == len(set(true.values()))  # and no two patients under one key
    assert {"train", "val"} <= {s for v in sides.values() for s in v}
