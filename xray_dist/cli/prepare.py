"""The data stage's commands: ``prepare`` (DICOM files to a cache), ``synth`` (synthetic DICOM
files to try it on) and ``preview`` (what the model sees of one file)."""

from __future__ import annotations

import io

from PIL import Image

from xray_dist.cli.common import add_path_flags, add_ray_flags, command, default
from xray_dist.config import LABELS_FORMATS, UNCERTAIN, PrepareConfig, PreprocessSpec
from xray_dist.data.dicom import load_image
from xray_dist.data.prepare import prepare
from xray_dist.data.synth import SITES, synthesize
from xray_dist.infra import storage


def add_prepare(sub) -> None:
    p = command(sub, "prepare", "decode DICOMs once into a Parquet cache with a patient-level split",
                "Reads every labelled DICOM file once (in parallel Ray tasks), writes the model inputs to a Parquet "
                "cache, splits patients into train/val/test, and lists every file it could not use, with the reason.")
    p.add_argument("data_dir", help="directory or object-store prefix (s3://...) holding the DICOM files, or a "
                                    "DICOMweb archive and its QIDO-RS filters: dicomweb+https://HOST/ROOT?Modality=CR "
                                    "(credentials: XRAY_DIST_DICOMWEB_TOKEN, or _USER and _PASSWORD)")
    p.add_argument("--labels", help="labels file (see --labels-format); default: a folder per class")
    p.add_argument("--labels-format", choices=LABELS_FORMATS, default=default(PrepareConfig, "labels_format"),
                   help="csv: a path (or file name/stem) and a label column, several findings as A|B; nih: "
                        "Data_Entry_2017.csv; chexpert: train.csv/valid.csv; rsna: stage_2_train_labels.csv; mimic: "
                        "mimic-cxr-2.0.0-chexpert.csv with --metadata (default: %(default)s)")
    p.add_argument("--uncertain", choices=UNCERTAIN, default=default(PrepareConfig, "uncertain"),
                   help="chexpert/mimic: what an uncertain (-1) finding becomes: ignore (left out of that image's "
                        "loss and metrics), zeros (absent) or ones (present) (default: %(default)s)")
    p.add_argument("--metadata", help="mimic: mimic-cxr-2.0.0-metadata.csv, joining dicom_id to study and view")
    p.add_argument("--dicomweb-connections", type=int, default=default(PrepareConfig, "dicomweb_connections"),
                   help="a dicomweb+http(s):// source: decode tasks retrieving from the archive at once, so that "
                        "prepare cannot overload it")
    p.add_argument("--mimic-patients", help="mimic: MIMIC-IV's patients.csv, giving each subject's sex and age at "
                                            "the study (default: none; the DICOM headers' then)")
    p.add_argument("--views", default="",
                   help="keep only these views, e.g. PA,AP (frontal): from the labels' view column, else the DICOM "
                        "View Position (0018,5101); the others are listed in the report (default: all views)")
    p.add_argument("--path-column", default=default(PrepareConfig, "path_column"),
                   help="csv format: the column naming each file; for a DICOMweb source SOPInstanceUID, "
                        "SeriesInstanceUID, StudyInstanceUID or AccessionNumber")
    p.add_argument("--label-column", default=default(PrepareConfig, "label_column"),
                   help="csv format: the column holding each file's label")
    p.add_argument("--patient-column", default=default(PrepareConfig, "patient_column"),
                   help="csv format: the column naming each image's patient (hashed like header IDs; default: "
                        "the DICOM Patient ID, else the Study Instance UID, else the file)")
    p.add_argument("--site-column", default=default(PrepareConfig, "site_column"),
                   help="csv format: the column naming each image's site, for `evaluate --by site` (default: a "
                        "salted key of the DICOM Institution Name, which is never stored)")
    p.add_argument("--out", required=True, help="cache directory (local or object store)")
    p.add_argument("--image-size", type=int, default=default(PreprocessSpec, "image_size"),
                   help="model input size in pixels (square)")
    p.add_argument("--max-pixels", type=int, default=default(PreprocessSpec, "max_pixels"),
                   help="refuse (quarantine as too_large) a file whose header declares more pixels than this, before "
                        "decoding it (rows x columns x frames x samples)")
    p.add_argument("--keep-burned-in", action="store_true",
                   help="use images whose (0028,0301) Burned In Annotation is YES (default: quarantined)")
    p.add_argument("--salt-file", help="file or URI holding the patient-key salt, never inside the cache (made, "
                                       "0600, when missing; default: XRAY_DIST_SALT, else ~/.config/xray-dist/salt)")
    add_path_flags(p, "the cache and its report")
    p.add_argument("--val-fraction", type=float, default=default(PrepareConfig, "val_fraction"),
                   help="share of patients (per label) for validation")
    p.add_argument("--test-fraction", type=float, default=default(PrepareConfig, "test_fraction"),
                   help="share of patients (per label) held out for `xray-dist evaluate`")
    p.add_argument("--split-file", action="append", default=[],
                   help="official splits: a CSV of path or patient plus split (train/val/test/train_val), or a "
                        "list of file names named for its split (test_list.txt, train_val_list.txt); repeatable. "
                        "Fixes those splits; validation is drawn from train_val and from files it does not name")
    p.add_argument("--seed", type=int, default=default(PrepareConfig, "seed"), help="seed of the patient split")
    add_ray_flags(p)


def cmd_prepare(a) -> int:
    cfg = PrepareConfig(
        data_dir=a.data_dir, out=a.out, labels=a.labels, path_column=a.path_column, label_column=a.label_column,
        patient_column=a.patient_column, site_column=a.site_column,
        labels_format=a.labels_format, uncertain=a.uncertain, metadata=a.metadata, mimic_patients=a.mimic_patients,
        dicomweb_connections=a.dicomweb_connections, uid_names=a.uid_names,
        views=tuple(v.strip().upper() for v in a.views.split(",") if v.strip()),
        preprocess=PreprocessSpec(image_size=a.image_size, burned_in="keep" if a.keep_burned_in else "reject",
                                  max_pixels=a.max_pixels),
        salt_file=a.salt_file, paths="redact" if a.redact_paths else "relative", path_map=a.path_map,
        split_files=tuple(a.split_file),
        val_fraction=a.val_fraction,
        test_fraction=a.test_fraction, seed=a.seed, address=a.address, num_cpus=a.num_cpus,
    )
    report = prepare(cfg)
    print(format_prepare_summary(report, a.out))
    return 0


def format_prepare_summary(report: dict, out: str) -> str:
    """prepare's report as the lines the terminal shows (also the demo's)."""
    lines = [
        f"prepare: {report['ok']} of {report['found']} files used, {len(report['quarantined'])} quarantined, "
        + (f"{len(report['excluded'])} excluded by view, " if report.get("excluded") else "")
        + f"{len(report['missing'])} label rows without a file, {len(report['unlabeled'])} unlabeled files"
        + (" (cache reused)" if report["cache_reused"] else ""),
        ("  findings (images): " if report.get("task") == "multilabel" else "  classes: ")
        + ", ".join(f"{k}={v}" for k, v in report["classes"].items()),
        "  splits:  " + ", ".join(f"{k}={v['images']} images/{v['patients']} patients" for k, v in report["splits"].items())
        + (f" (split fingerprint {report['split_fingerprint']}, seed {report['split_settings']['seed']})"
           if report.get("split_fingerprint") else ""),
        "  patient keys from: " + ", ".join(f"{k.replace('_', ' ')}={v}"
                                            for k, v in report.get("patients_grouped_by", {}).items()),
    ]
    for q in report["quarantined"][:10]:
        lines.append(f"  quarantined {q['path']}: {q['reason']}")
    if len(report["quarantined"]) > 10:
        lines.append(f"  ... and {len(report['quarantined']) - 10} more")
    for m in report["missing"][:5]:
        lines.append(f"  missing {m['path']}: {m['reason']}")
    for w in report.get("warnings", []):
        lines.append(f"  warning: {w}")
    lines.append(f"  report: {storage.join(storage.absolute(out), 'prepare_report.json')}")
    return "\n".join(lines)


def add_synth(sub) -> None:
    p = command(sub, "synth", "write synthetic chest-like radiographs as DICOM files + labels.csv",
                "Synthetic radiographs in every encoding the reader handles (MONOCHROME1/2, rescale, windowing, "
                "RLE, JPEG 2000...), one finding per class, to try the whole flow without patient data.")
    p.add_argument("out", help="directory (or object-store prefix) to write")
    p.add_argument("--patients", type=int, default=40, help="number of patients (one class each)")
    p.add_argument("--images-per-patient", type=int, default=2, help="images per patient")
    p.add_argument("--classes", default="normal,finding", help="comma-separated class names; the first has no finding")
    p.add_argument("--size", type=int, default=256, help="image size in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--sites", type=int, choices=range(1, len(SITES) + 1), default=1, metavar=f"1-{len(SITES)}",
                   help="hospitals the patients come from (each with its own scanner; every site has every class)")
    p.add_argument("--subtle-site", type=int, default=None, metavar="K",
                   help="make the finding subtler (30%% of its contrast) in site K (0-based), so that "
                        "`evaluate --by site` has a gap to find")


def cmd_synth(a) -> int:
    classes = tuple(c.strip() for c in a.classes.split(",") if c.strip())
    storage.check_location(a.out)
    with storage.staged_output(a.out, marker="labels.csv") as local:  # a URI gets the files when all are written
        r = synthesize(local, patients=a.patients, images_per_patient=a.images_per_patient, classes=classes,
                       size=a.size, seed=a.seed, sites=a.sites, subtle_site=a.subtle_site)
    out = storage.absolute(a.out)
    print(f"synth: wrote {len(r.files)} DICOM files for {a.patients} patients to {out}; labels in "
          f"{storage.join(out, 'labels.csv')}")
    return 0


def add_preview(sub) -> None:
    p = command(sub, "preview", "write a PNG of exactly what the model sees for one DICOM file",
                "Reads one DICOM file as prepare and predict do (rescale, window, MONOCHROME1, padding, resize).")
    p.add_argument("file", help="a DICOM file (local or URI)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--size", type=int, default=default(PreprocessSpec, "image_size"), help="model input size in pixels")


def cmd_preview(a) -> int:
    img = load_image(a.file, PreprocessSpec(image_size=a.size))
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG")
    storage.write_bytes(a.out, buf.getvalue())
    print(f"preview: {a.file} -> {a.out} ({a.size}x{a.size}, 8-bit grayscale, MONOCHROME2)")
    return 0
