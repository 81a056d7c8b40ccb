"""xray_dist.data.labels and xray_dist.data.splits: label sources, unsafe rows, patient-level splits."""

from __future__ import annotations

from collections import Counter

import pytest

from xray_dist.errors import PrepareError
from xray_dist.data.labels import LabelColumns, from_csv, from_folders
from xray_dist.data.splits import patient_labels, split_patients


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


class TestCSV:
    def test_paths_missing_escape_unlabeled(self, tmp_path):
        data = tmp_path / "data"
        touch(data / "a" / "1.dcm")
        touch(data / "a" / "2.dcm")
        touch(data / "stray.dcm")
        touch(tmp_path / "secret.dcm")
        csv = data / "labels.csv"
        csv.write_text("path,label\na/1.dcm,normal\na/2.dcm,\nnope.dcm,normal\n../secret.dcm,normal\n")
        scan = from_csv(data, csv)
        assert scan.items == [("a/1.dcm", "normal")]
        reasons = {m["path"]: m["reason"] for m in scan.missing}
        assert "escapes" in reasons["../secret.dcm"]
        assert reasons["nope.dcm"] == "file not found"
        assert "empty 'label'" in reasons["a/2.dcm"]
        assert scan.unlabeled == ["a/2.dcm", "stray.dcm"] or set(scan.unlabeled) == {"stray.dcm", "a/2.dcm"}

    def test_rsna_stems_and_repeated_rows(self, tmp_path):
        data = tmp_path / "data"
        touch(data / "stage_2_train_images" / "0004cfab.dcm")
        touch(data / "stage_2_train_images" / "00313ee0.dcm")
        touch(data / "stage_2_train_images" / "0a0f91dc.dcm")
        csv = tmp_path / "stage_2_train_labels.csv"
        csv.write_text("patientId,x,Target\n0004cfab,,0\n00313ee0,1,1\n00313ee0,2,1\n0a0f91dc,1,1\n0a0f91dc,,0\n")
        scan = from_csv(data, csv, LabelColumns(path="patientId", label="Target"))
        assert scan.items == [("stage_2_train_images/0004cfab.dcm", "0"), ("stage_2_train_images/00313ee0.dcm", "1")]
        assert scan.missing == [{"path": "stage_2_train_images/0a0f91dc.dcm", "reason": "conflicting labels in the CSV; not used"}]
        assert scan.unlabeled == []

    def test_missing_column_is_named(self, tmp_path):
        (tmp_path / "l.csv").write_text("file,label\n")
        with pytest.raises(PrepareError, match="--path-column"):
            from_csv(tmp_path, tmp_path / "l.csv")


class TestFolders:
    def test_folder_per_class(self, tmp_path):
        touch(tmp_path / "normal" / "p1" / "a.dcm")
        touch(tmp_path / "pneumonia" / "b.dcm")
        touch(tmp_path / "loose.dcm")
        scan = from_folders(tmp_path)
        assert scan.items == [("normal/p1/a.dcm", "normal"), ("pneumonia/b.dcm", "pneumonia")]
        assert scan.unlabeled == ["loose.dcm"]


class TestSplits:
    def strata(self, n=60):
        return {f"p{i:03d}": ("normal" if i % 3 else "finding") for i in range(n)}

    def test_deterministic_and_seed_sensitive(self):
        s = self.strata()
        assert split_patients(s, 0.2, 0.1, 5) == split_patients(s, 0.2, 0.1, 5)
        assert split_patients(s, 0.2, 0.1, 5) != split_patients(s, 0.2, 0.1, 6)

    def test_stratified_fractions(self):
        s = self.strata()
        out = split_patients(s, 0.25, 0.15, 0)
        for label in ("normal", "finding"):
            members = [p for p in s if s[p] == label]
            c = Counter(out[p] for p in members)
            assert c["val"] == round(len(members) * 0.25)
            assert c["test"] == round(len(members) * 0.15)

    def test_every_class_in_validation(self):
        s = {"a": "x", "b": "x", "c": "y", "d": "y", "e": "y", "f": "y", "g": "y"}
        out = split_patients(s, 0.1, 0.0, 0)
        assert {s[p] for p in out if out[p] == "val"} == {"x", "y"}
        assert {s[p] for p in out if out[p] == "train"} == {"x", "y"}

    def test_patient_label_majority(self):
        assert patient_labels([("p", "a"), ("p", "b"), ("p", "b"), ("q", "b"), ("q", "a")]) == {"p": "b", "q": "a"}
