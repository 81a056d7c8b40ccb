"""Hostile label sources: a symlink out of the data directory in a folder-per-class tree (or found
by its stem from a labels file), and labels rows holding a NUL byte or text that is not UTF-8. Each
is one listed, unused entry with its reason; everything else is used."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil

import pytest

from xray_dist.data.labels import from_csv, from_folders, from_nih, list_entries, scan_labels


def touch(path, data: bytes = b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# ---- symlinks leading out ----------------------------------------------------------------------------

class TestSymlinkOut:
    def test_folder_per_class_lists_a_link_out_and_uses_the_others(self, tmp_path):
        data = tmp_path / "data"
        touch(data / "normal" / "1.dcm")
        touch(data / "finding" / "deep" / "2.dcm")
        touch(tmp_path / "elsewhere" / "private.dcm")
        os.symlink(tmp_path / "elsewhere" / "private.dcm", data / "finding" / "link.dcm")
        os.symlink(data / "normal" / "1.dcm", data / "finding" / "alias.dcm")  # a link that stays inside: used
        scan = scan_labels(data, None)
        assert scan.items == [("finding/alias.dcm", "finding"), ("finding/deep/2.dcm", "finding"),
                              ("normal/1.dcm", "normal")]
        assert scan.missing == [{"path": "finding/link.dcm",
                                 "reason": "symlink leading outside the data directory; not read"}]
        assert scan.unlabeled == []

    def test_a_link_out_by_a_relative_target_and_a_top_level_one(self, tmp_path):
        data = tmp_path / "data"
        touch(data / "normal" / "1.dcm")
        touch(tmp_path / "private.dcm")
        os.symlink("../../private.dcm", data / "normal" / "up.dcm")
        os.symlink(tmp_path / "private.dcm", data / "stray.dcm")  # top level: unlabeled, never an item
        scan = from_folders(data)
        assert scan.items == [("normal/1.dcm", "normal")]
        assert [m["path"] for m in scan.missing] == ["normal/up.dcm"]
        assert "outside the data directory" in scan.missing[0]["reason"]
        assert scan.unlabeled == ["stray.dcm"]

    def test_a_labels_file_refuses_the_link_by_path_and_by_stem_alike(self, tmp_path):
        data = tmp_path / "data"
        touch(data / "images" / "00000001_000.dcm")
        touch(tmp_path / "private.dcm")
        os.symlink(tmp_path / "private.dcm", data / "images" / "00000002_000.dcm")
        labels = tmp_path / "labels.csv"
        labels.write_text("path,label\nimages/00000001_000.dcm,normal\nimages/00000002_000.dcm,finding\n")
        scan = from_csv(data, labels)
        assert scan.items == [("images/00000001_000.dcm", "normal")]
        assert [m["path"] for m in scan.missing] == ["images/00000002_000.dcm"]
        assert "escapes the data directory" in scan.missing[0]["reason"]
        nih = tmp_path / "Data_Entry_2017.csv"  # found by its stem, not by its path
        nih.write_text("Image Index,Finding Labels,Patient ID\n00000001_000.png,No Finding,1\n"
                       "00000002_000.png,Effusion,2\n")
        scan = from_nih(data, nih, list_entries(data))
        assert scan.items == [("images/00000001_000.dcm", "normal")]
        assert scan.missing == [{"path": "images/00000002_000.dcm",
                                 "reason": "symlink leading outside the data directory; not read"}]
        assert scan.unlabeled == []


# ---- bad bytes in a labels row -----------------------------------------------------------------------

def labels_bytes(rows: list[list[str]]) -> bytes:
    buf = io.StringIO(newline="")
    csv.writer(buf, lineterminator="\n").writerows([["path", "label", "note"], *rows])
    return buf.getvalue().encode()


class TestBadBytes:
    def test_a_nul_byte_or_non_utf8_text_costs_its_row_only_named_by_line(self, tmp_path):
        data = tmp_path / "data"
        for i in range(6):
            touch(data / "a" / f"{i}.dcm")
        text = labels_bytes([["a/0.dcm", "normal", "two\nlines"],  # lines 2-3: a quoted cell spans two
                             ["a/1.dcm", "normal", ""],              # line 4
                             ["a/2.dcm", "finding", ""],             # line 5
                             ["a/3.dcm", "finding", ""],             # line 6
                             ["a/4.dcm", "normal", ""],              # line 7
                             ["a/5.dcm", "finding", ""]])            # line 8
        text = text.replace(b"a/1.dcm,normal", b"a/1.dcm,nor\x00mal")       # NUL in a label cell
        text = text.replace(b"a/3.dcm", b"a/3\x00.dcm")                     # NUL in a path cell
        text = text.replace(b"a/4.dcm,normal", b"a/4.dcm,norm\xe9l")        # Latin-1, not UTF-8
        (tmp_path / "labels.csv").write_bytes(text)
        scan = from_csv(data, tmp_path / "labels.csv")
        assert scan.items == [("a/0.dcm", "normal"), ("a/2.dcm", "finding"), ("a/5.dcm", "finding")]
        assert scan.missing == [
            {"path": "a/1.dcm", "reason": "line 4 of the labels CSV: a NUL byte in a cell; row not used"},
            {"path": "a/3\\x00.dcm", "reason": "line 6 of the labels CSV: a NUL byte in a cell; row not used"},
            {"path": "a/4.dcm", "reason": "line 7 of the labels CSV: a cell that is not UTF-8 text (byte 0xe9); "
                                          "row not used"},
        ]
        assert scan.unlabeled == ["a/1.dcm", "a/3.dcm", "a/4.dcm"]  # the files themselves: nobody labelled them
        json.dumps(scan.missing, ensure_ascii=False).encode("utf-8")  # a report can write every entry

    def test_the_cohort_formats_too(self, tmp_path):
        data = tmp_path / "data"
        touch(data / "00000001_000.dcm")
        touch(data / "00000002_000.dcm")
        nih = tmp_path / "Data_Entry_2017.csv"
        nih.write_bytes(b"Image Index,Finding Labels,Patient ID\n00000001_000.png,No Finding,1\n"
                        b"00000002_000.png,Effu\xffsion,2\n")
        scan = scan_labels(data, str(nih), labels_format="nih")
        assert scan.items == [("00000001_000.dcm", "normal")]
        assert scan.missing == [{"path": "00000002_000.png", "reason": "line 3 of the NIH labels CSV "
                                 "(Data_Entry_2017.csv): a cell that is not UTF-8 text (byte 0xff); row not used"}]


# ---- end to end: prepare -----------------------------------------------------------------------------

@pytest.mark.slow
def test_prepare_uses_every_row_but_the_bad_ones_and_lists_them_by_line(ray_cluster, synth_binary, tmp_path):
    from xray_dist.cli import app as cli
    from xray_dist.data.cache import load_manifest

    rows = sorted(synth_binary.labels.items())
    bad = {5: rows[3][0], 12: rows[10][0]}  # line -> the file its row names (the header is line 1)
    text = labels_bytes([[rel, lab, ""] for rel, lab in rows])
    lines = text.split(b"\n")
    lines[4] = lines[4].replace(b",", b",\x00", 1)  # line 5: a NUL byte before its label
    lines[11] = lines[11] + b"\xc3"  # line 12: its last cell ends half-way through a UTF-8 sequence
    labels = tmp_path / "labels.csv"
    labels.write_bytes(b"\n".join(lines))
    cache = tmp_path / "cache"
    assert cli.main(["prepare", str(synth_binary.out), "--labels", str(labels), "--out", str(cache),
                     "--image-size", "32"]) == 0
    report = json.loads((cache / "prepare_report.json").read_text())
    assert report["missing"] == [
        {"path": bad[5], "reason": "line 5 of the labels CSV: a NUL byte in a cell; row not used"},
        {"path": bad[12], "reason": "line 12 of the labels CSV: a cell that is not UTF-8 text (byte 0xc3); "
                                    "row not used"},
    ]
    used = sorted(load_manifest(cache).column("path").to_pylist())
    assert used == sorted(rel for rel, _ in rows if rel not in bad.values())
    assert len(used) == len(rows) - 2 == report["ok"] and report["quarantined"] == []
    assert sorted(report["unlabeled"]) == sorted(bad.values())


@pytest.mark.slow
def test_prepare_folder_per_class_never_reads_a_link_out(ray_cluster, synth_binary, tmp_path):
    from xray_dist.cli import app as cli
    from xray_dist.data.cache import load_manifest

    data = tmp_path / "data"
    chosen = sorted(synth_binary.labels.items())[:24]
    for rel, lab in chosen:
        (data / lab).mkdir(parents=True, exist_ok=True)
        shutil.copy(synth_binary.out / rel, data / lab / os.path.basename(rel))
    outside = next(synth_binary.out / rel for rel, lab in sorted(synth_binary.labels.items())[24:]
                   if lab == "finding")  # a readable radiograph: used, were it read
    os.symlink(outside, data / "finding" / "zz_link.dcm")
    cache = tmp_path / "cache"
    assert cli.main(["prepare", str(data), "--out", str(cache), "--image-size", "32"]) == 0
    report = json.loads((cache / "prepare_report.json").read_text())
    assert report["missing"] == [{"path": "finding/zz_link.dcm",
                                  "reason": "symlink leading outside the data directory; not read"}]
    used = sorted(load_manifest(cache).column("path").to_pylist())
    assert used == sorted(f"{lab}/{os.path.basename(rel)}" for rel, lab in chosen)
    assert report["ok"] == len(chosen) and report["quarantined"] == [] and report["found"] == len(chosen)
