"""xray_dist.data.dicom: one class per pipeline step / policy, files written by the tests or shipped
by pydicom-data (real CR radiographs RG1 chest and RG3 extremity)."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from xray_dist.data import dicom, patients
from xray_dist.config import PreprocessSpec
from xray_dist.errors import (
    CorruptPixelDataError,
    DicomReadError,
    NoPixelDataError,
    NotDicomError,
    UnsupportedImageError,
)

SPEC = PreprocessSpec(image_size=64)
FULL = PreprocessSpec(image_size=64, j2k_reduce=False)  # JPEG 2000 decoded at full resolution


def shipped(name: str) -> str:
    p = get_testdata_file(name)
    assert p, f"pydicom-data does not ship {name}"
    return p


def write_gray(path, stored: np.ndarray, photometric="MONOCHROME2", bits=None, **attrs) -> str:
    """A minimal CR file with the given stored values and extra attributes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "P1"
    ds.Modality = "CR"
    ds.set_pixel_data(stored, photometric, bits or stored.dtype.itemsize * 8)
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)
    return str(path)


class TestTransferSyntaxes:
    """Every listed syntax decodes; lossless pairs give identical model input, lossy is close."""

    @pytest.mark.parametrize("stem", ["RG1", "RG3"])
    def test_real_radiograph_j2k_lossless_identical_to_uncompressed(self, stem):
        # pydicom-data pairs J2KR with UNCR (reversible) and J2KI with UNCI (its lossy decode)
        unc = dicom.load_image(shipped(f"{stem}_UNCR.dcm"), FULL)
        j2kr = dicom.load_image(shipped(f"{stem}_J2KR.dcm"), FULL)
        np.testing.assert_array_equal(unc, j2kr)
        assert unc.std() > 20  # a real radiograph, not a blank

    @pytest.mark.parametrize("stem", ["RG1", "RG3"])
    def test_real_radiograph_j2k_lossy_close(self, stem):
        unc = dicom.load_image(shipped(f"{stem}_UNCR.dcm"), FULL).astype(int)
        j2ki = dicom.load_image(shipped(f"{stem}_J2KI.dcm"), FULL).astype(int)
        assert np.abs(unc - j2ki).mean() < 2.0
        assert np.abs(unc - j2ki).max() <= 40

    def test_real_radiograph_monochrome1_is_inverted(self):
        # RG1 is a MONOCHROME1 chest CR: after inversion the (dense) mediastinum is brighter than the lungs'
        # air and the collimated border; the image centre must be brighter than the darkest part.
        ds = pydicom.dcmread(shipped("RG1_UNCI.dcm"))
        assert ds.PhotometricInterpretation == "MONOCHROME1"
        shown = dicom.unit_gray(ds, "RG1")
        raw = dicom.voi_unit_range(dicom.modality_values(ds.pixel_array, ds), ds, "RG1")
        np.testing.assert_allclose(shown, 1.0 - raw)
        h, w = shown.shape  # the patient's centre is denser (brighter) than the image's corners after inversion
        assert shown[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3].mean() > shown[: h // 10, : w // 10].mean()

    @pytest.mark.parametrize("compressed,reference", [
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR_small_bigendian.dcm", "MR_small.dcm"),
        ("MR_small_implicit.dcm", "MR_small.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
        ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),
    ])
    def test_lossless_syntaxes_identical(self, compressed, reference):
        if "emri" in reference:  # multi-frame: compare decoded first frames through the pipeline steps
            a = pydicom.dcmread(shipped(compressed)).pixel_array[0]
            b = pydicom.dcmread(shipped(reference)).pixel_array[0]
            np.testing.assert_array_equal(a, b)
            return
        np.testing.assert_array_equal(dicom.load_image(shipped(compressed), SPEC),
                                      dicom.load_image(shipped(reference), SPEC))

    @pytest.mark.parametrize("name", [
        "JPEG-LL.dcm",                        # JPEG lossless process 14 SV1 (.70)
        "JPGLosslessP14SV1_1s_1f_8b.dcm",
        "JPGExtended.dcm",                    # JPEG extended 12-bit (.51)
        "SC_rgb_jpeg_dcmtk.dcm",              # JPEG baseline (.50), YBR
        "JPEGLSNearLossless_16.dcm",          # JPEG-LS near-lossless (.81)
        "SC_rgb_rle.dcm",
        "examples_jpeg2k.dcm",
    ])
    def test_other_syntaxes_decode(self, name):
        img = dicom.load_image(shipped(name), SPEC)
        assert img.shape == (64, 64) and img.dtype == np.uint8
        assert img.std() > 1


class TestJ2KReduce:
    """Reduced-resolution JPEG 2000 decode (xray_dist.data.j2k): taken where valid, and the model input
    it gives matches the full decode's. Stated tolerance, on real radiographs: mean absolute
    difference <= 0.7 grey levels (of 255) and 99th percentile <= 5."""

    @pytest.mark.parametrize("stem", ["RG1_J2KR", "RG3_J2KR", "RG1_J2KI", "RG3_J2KI"])
    @pytest.mark.parametrize("size", [64, 224])
    def test_real_radiographs_within_tolerance(self, stem, size):
        from xray_dist.data.j2k import decode_reduced

        ds = dicom.read_dataset(shipped(f"{stem}.dcm"))
        reduced = decode_reduced(ds, size)
        assert reduced is not None and reduced.shape[0] < ds.Rows  # the fast path was taken
        assert max(reduced.shape) >= size  # and still covers the model input
        fast = dicom.load_image(shipped(f"{stem}.dcm"), PreprocessSpec(image_size=size)).astype(int)
        full = dicom.load_image(shipped(f"{stem}.dcm"), PreprocessSpec(image_size=size, j2k_reduce=False))
        d = np.abs(fast - full)
        assert d.mean() <= 0.7 and np.percentile(d, 99) <= 5, (d.mean(), np.percentile(d, 99))

    def test_exact_stored_values_after_pillows_scaling(self):
        """At reduction 1 the decoder's 16-bit scaling is undone exactly: averaging pydicom's full
        decode over 2x2 blocks lands within the 5/3 wavelet's rounding of the reduced values."""
        from xray_dist.data.j2k import decode_reduced

        ds = dicom.read_dataset(shipped("RG3_J2KR.dcm"))  # 10 bits stored, 1760 px
        reduced = decode_reduced(ds, 440).astype(float)  # covered twice over: one level down, 880 px
        full = ds.pixel_array.astype(float)
        assert reduced.shape == (880, 880) and reduced.max() <= 2**10 - 1
        block = full.reshape(880, 2, 880, 2).mean(axis=(1, 3))
        assert abs(reduced.mean() - block.mean()) < 1.0  # same scale: no 64x Pillow scaling left

    def test_reduce_factor(self):
        from xray_dist.data.j2k import reduce_factor

        assert reduce_factor(2048, 2048, 224, 5) == 3  # 256 px covers 224
        assert reduce_factor(1955, 1841, 224, 5) == 3
        assert reduce_factor(2048, 2048, 32, 5) == 5  # capped by the decomposition levels
        assert reduce_factor(200, 200, 224, 5) == 0

    def test_not_taken_where_invalid(self, tmp_path):
        from xray_dist.data.j2k import decode_reduced

        assert decode_reduced(dicom.read_dataset(shipped("RG1_UNCR.dcm")), 64) is None  # not JPEG 2000
        ds = dicom.read_dataset(shipped("RG3_J2KR.dcm"))
        del ds.WindowCenter, ds.WindowWidth  # min-max range would shift with resolution
        assert decode_reduced(ds, 64) is None
        ds = dicom.read_dataset(shipped("RG3_J2KR.dcm"))
        assert decode_reduced(ds, 4096) is None  # nothing to save

    def test_spec_round_trip_and_old_specs_never_reduce(self):
        assert PreprocessSpec.from_dict(SPEC.to_dict()).j2k_reduce is True
        old = {"image_size": 64, "aspect": "pad", "storage_dtype": "uint8", "window": "first", "pipeline_version": 1}
        assert PreprocessSpec.from_dict(old).j2k_reduce is False


class TestModalityLUT:
    def test_rescale_slope_intercept(self, tmp_path):
        stored = np.arange(16, dtype=np.int16).reshape(4, 4) - 8
        p = write_gray(tmp_path / "r.dcm", stored, bits=16, RescaleSlope=3, RescaleIntercept=-100)
        ds = pydicom.dcmread(p)
        np.testing.assert_allclose(dicom.modality_values(ds.pixel_array, ds), stored * 3.0 - 100)

    def test_modality_lut_sequence(self):
        ds = pydicom.dcmread(shipped("mlut_18.dcm"))
        out = dicom.modality_values(ds.pixel_array, ds)
        lut = np.asarray(ds.ModalityLUTSequence[0].LUTData)
        assert out.min() >= lut.min() and out.max() <= lut.max()
        assert not np.array_equal(out, ds.pixel_array.astype(float))


class TestVOI:
    def test_linear_window_formula(self):
        # PS3.3 C.11.2.1.2.1 with c=50, w=11: x <= 44.5 -> 0, x > 54.5 -> 1, linear between.
        x = np.array([0, 44.5, 45, 49.5, 54.5, 55, 100], dtype=float)
        y = dicom.apply_window(x, 50, 11)
        np.testing.assert_allclose(y, [0, 0, 0.05, 0.5, 1.0, 1.0, 1.0])

    def test_linear_exact_and_sigmoid(self):
        x = np.array([0, 40, 50, 60, 100], dtype=float)
        np.testing.assert_allclose(dicom.apply_window(x, 50, 20, "LINEAR_EXACT"), [0, 0, 0.5, 1, 1])
        s = dicom.apply_window(x, 50, 20, "SIGMOID")
        assert s[2] == pytest.approx(0.5) and np.all(np.diff(s) > 0)

    def test_first_window_used(self, tmp_path):
        stored = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (100, 1))
        p = write_gray(tmp_path / "w.dcm", stored, bits=16, WindowCenter=[500, 100], WindowWidth=[1001, 10])
        ds = pydicom.dcmread(p)
        x = dicom.voi_unit_range(dicom.modality_values(ds.pixel_array, ds), ds, p)
        np.testing.assert_allclose(x[0], dicom.apply_window(stored[0].astype(float), 500, 1001))

    def test_window_applies_after_rescale(self, tmp_path):
        stored = np.full((8, 8), 100, dtype=np.uint16)
        # modality value 2*100-1000 = -800 sits at the centre of the window -> 0.5 (nearly)
        p = write_gray(tmp_path / "rw.dcm", stored, bits=16, RescaleSlope=2, RescaleIntercept=-1000,
                       WindowCenter=-800, WindowWidth=401)
        assert dicom.load_image(p, SPEC).mean() == pytest.approx(129, abs=1)

    def test_voi_lut_sequence(self):
        ds = pydicom.dcmread(shipped("vlut_04.dcm"))
        x = dicom.voi_unit_range(dicom.modality_values(ds.pixel_array, ds), ds, "vlut_04.dcm")
        assert 0.0 <= x.min() < x.max() <= 1.0

    def test_no_voi_is_min_max(self, tmp_path):
        stored = np.array([[100, 200], [300, 500]], dtype=np.uint16)
        ds = pydicom.dcmread(write_gray(tmp_path / "m.dcm", stored, bits=16))
        np.testing.assert_allclose(dicom.voi_unit_range(stored.astype(float), ds, "m"), [[0, 0.25], [0.5, 1]])

    @pytest.mark.parametrize("function, width", [("LINEAR", 11), ("LINEAR", 1), ("LINEAR_EXACT", 20),
                                                 ("SIGMOID", 20)])
    def test_same_window_as_pydicom(self, tmp_path, function, width):
        # pydicom's apply_windowing is the reference: its output range is the stored bit depth's
        # (0..4095 for 12 unsigned bits), ours is [0, 1]
        from pydicom.pixels import apply_windowing

        stored = np.arange(0, 101, dtype=np.uint16).reshape(1, -1)
        ds = pydicom.dcmread(write_gray(tmp_path / "w.dcm", stored, bits=12, WindowCenter=50, WindowWidth=width,
                                        VOILUTFunction=function))
        ours = dicom.voi_unit_range(dicom.modality_values(ds.pixel_array, ds), ds, "w.dcm")
        theirs = apply_windowing(ds.pixel_array.astype(float), ds) / 4095
        np.testing.assert_allclose(ours, theirs, atol=1e-12)
        assert 0 < ours.mean() < 1

    def test_unknown_voi_lut_function_is_refused_as_pydicom_does(self, tmp_path):
        from pydicom.pixels import apply_windowing

        stored = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (100, 1))
        p = write_gray(tmp_path / "foo.dcm", stored, bits=16, WindowCenter=500, WindowWidth=1001, VOILUTFunction="FOO")
        ds = pydicom.dcmread(p)
        with pytest.raises(ValueError, match="VOI LUT Function"):  # pydicom refuses it too
            apply_windowing(ds.pixel_array, ds)
        with pytest.raises(UnsupportedImageError) as e:  # never read as LINEAR
            dicom.load_image(p, SPEC)
        assert e.value.path == p and e.value.kind == "unsupported_image"
        assert e.value.reason == "(0028,1056) VOI LUT Function 'FOO' is not LINEAR, LINEAR_EXACT or SIGMOID"
        with pytest.raises(ValueError, match=r"\(0028,1056\) VOI LUT Function 'FOO'"):
            dicom.apply_window(stored.astype(float), 500, 1001, "FOO")

    def test_sigmoid_width_zero_is_refused_not_nan(self, tmp_path):
        from pydicom.pixels import apply_windowing

        stored = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (100, 1))
        p = write_gray(tmp_path / "sig0.dcm", stored, bits=16, WindowCenter=500, WindowWidth=0, VOILUTFunction="SIGMOID")
        ds = pydicom.dcmread(p)
        with pytest.raises(ValueError, match="greater than 0"):  # pydicom refuses it too
            apply_windowing(ds.pixel_array, ds)
        with pytest.raises(CorruptPixelDataError) as e:  # the formula would give NaN at the center (0 / 0)
            dicom.load_image(p, SPEC)
        assert e.value.path == p and e.value.kind == "corrupt_pixel_data"
        assert e.value.reason.startswith("(0028,1050) Window Center / (0028,1051) Window Width unusable: SIGMOID "
                                         "window width must be > 0, got 0.0"), e.value.reason
        for width in (0, -5):
            with pytest.raises(ValueError, match="SIGMOID window width must be > 0"):
                dicom.apply_window(stored.astype(float), 500, width, "SIGMOID")

    def test_bad_windows_are_quarantined_by_prepares_decoder(self, tmp_path):
        """What prepare's decode tasks make of them: a row with the kind and the reason (the path
        scrubbed to the file's name), black pixels, and the good file beside them unchanged."""
        from xray_dist.data.decode import decode_batch

        stored = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (100, 1))
        rels = ["a/foo.dcm", "a/sig0.dcm", "a/ok.dcm"]
        (tmp_path / "a").mkdir()
        write_gray(tmp_path / rels[0], stored, bits=16, WindowCenter=500, WindowWidth=1001, VOILUTFunction="FOO")
        write_gray(tmp_path / rels[1], stored, bits=16, WindowCenter=500, WindowWidth=0, VOILUTFunction="SIGMOID")
        write_gray(tmp_path / rels[2], stored, bits=16, WindowCenter=500, WindowWidth=1001, VOILUTFunction="SIGMOID")
        full = [str(tmp_path / r) for r in rels]
        rows = decode_batch({"path": np.asarray(rels, dtype=object), "rel": np.asarray(rels, dtype=object),
                             "abspath": np.asarray(full, dtype=object)}, SPEC.to_dict(), "s" * 32)
        assert list(rows["error_kind"]) == ["unsupported_image", "corrupt_pixel_data", ""]
        assert rows["error"][0] == "(0028,1056) VOI LUT Function 'FOO' is not LINEAR, LINEAR_EXACT or SIGMOID"
        assert "(0028,1051) Window Width unusable: SIGMOID window width must be > 0" in rows["error"][1]
        assert not any(str(tmp_path) in e for e in rows["error"])
        assert rows["image"][:2].max() == 0
        np.testing.assert_array_equal(rows["image"][2], dicom.load_image(full[2], SPEC))
        assert rows["image"][2].std() > 10


class TestPhotometric:
    def test_monochrome1_equals_inverted_monochrome2(self, tmp_path):
        rng = np.random.default_rng(0)
        v = rng.integers(0, 4096, (50, 50)).astype(np.uint16)
        m2 = write_gray(tmp_path / "m2.dcm", v, "MONOCHROME2", 12)
        m1 = write_gray(tmp_path / "m1.dcm", (4095 - v).astype(np.uint16), "MONOCHROME1", 12)
        np.testing.assert_array_equal(dicom.load_image(m1, SPEC), dicom.load_image(m2, SPEC))

    def test_rgb_becomes_luminance(self):
        ds = pydicom.dcmread(shipped("SC_rgb.dcm"))
        x = dicom.unit_gray(ds, "SC_rgb.dcm")
        rgb = ds.pixel_array.astype(float)
        expected = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255
        np.testing.assert_allclose(x, expected)

    def test_palette_colour(self):
        img = dicom.load_image(shipped("examples_palette.dcm"), SPEC)
        assert img.std() > 5


class TestResize:
    def test_pad_keeps_aspect(self, tmp_path):
        v = np.full((100, 50), 4095, dtype=np.uint16)
        v[0, 0] = 0  # give min-max a range: the image is white
        img = dicom.load_image(write_gray(tmp_path / "tall.dcm", v, bits=12), PreprocessSpec(image_size=20))
        assert img.shape == (20, 20)
        assert img[:, :4].max() == 0 and img[:, -4:].max() == 0  # black side bars
        assert img[2:-2, 7:13].min() > 240  # the image itself, unstretched in the middle

    def test_preview_matches_cache_size(self):
        assert dicom.load_image(shipped("RG3_UNCI.dcm"), PreprocessSpec(image_size=224)).shape == (224, 224)


class TestRejected:
    def test_not_dicom(self, tmp_path):
        p = tmp_path / "notes.dcm"
        p.write_text("this is not DICOM")
        with pytest.raises(NotDicomError, match="notes.dcm"):
            dicom.load_image(p, SPEC)

    def test_empty_file(self, tmp_path):
        p = tmp_path / "empty.dcm"
        p.write_bytes(b"")
        with pytest.raises(DicomReadError, match="empty.dcm"):
            dicom.load_image(p, SPEC)

    def test_structured_report_has_no_pixels(self):
        with pytest.raises(NoPixelDataError, match="Pixel Data"):
            dicom.load_image(shipped("reportsi.dcm"), SPEC)

    def test_multi_frame(self):
        with pytest.raises(UnsupportedImageError, match="Number of Frames = 10"):
            dicom.load_image(shipped("emri_small.dcm"), SPEC)

    def test_truncated_pixel_data(self, tmp_path):
        good = write_gray(tmp_path / "g.dcm", np.ones((64, 64), np.uint16), bits=12)
        data = open(good, "rb").read()
        bad = tmp_path / "truncated.dcm"
        bad.write_bytes(data[: len(data) - 3000])
        with pytest.raises(DicomReadError, match="truncated.dcm") as e:
            dicom.load_image(bad, SPEC)
        # a file cut off is reported as such (kind and reason), not as a codec's failure
        assert e.value.kind == "truncated" and e.value.reason.startswith("truncated: "), (e.value.kind, e.value.reason)

    def test_truncated_j2k_stream(self):
        with pytest.raises(DicomReadError):
            dicom.load_image(shipped("emri_small_jpeg_2k_lossless_too_short.dcm"), SPEC)

    def test_shipped_truncated_file(self):
        """pydicom's own cut-off file: its Pixel Data element holds 8130 of its declared 8192 bytes."""
        from xray_dist.errors import TruncatedError

        with pytest.raises(TruncatedError, match=r"MR_truncated.*truncated: .* ends inside \(7FE0,0010\) \(8130 of its 8192"):
            dicom.load_image(shipped("MR_truncated.dcm"), SPEC)

    def test_errors_survive_pickling(self):
        e = pickle.loads(pickle.dumps(NotDicomError("/data/x.dcm", "not a DICOM Part 10 file")))
        assert isinstance(e, NotDicomError) and e.path == "/data/x.dcm" and e.reason.startswith("not a")
        assert e.kind == "not_dicom"

    def test_missing_codec_names_package(self):
        # A fresh process whose JPEG 2000 decoder has no plugins left, as on a machine without
        # pylibjpeg-openjpeg (and without Pillow's JPEG 2000 support).
        code = (
            "from pydicom.pixels import get_decoder\n"
            "from pydicom.uid import JPEG2000Lossless\n"
            "d = get_decoder(JPEG2000Lossless)\n"
            "for name in list(d.available_plugins):\n    d.remove_plugin(name)\n"
            "from xray_dist.data.dicom import read_dataset\n"
            "from xray_dist.errors import MissingCodecError\n"
            f"try:\n    read_dataset({shipped('RG3_J2KR.dcm')!r})\n"
            "except MissingCodecError as e:\n    print('MISSING', e)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert "MISSING" in out.stdout, out.stderr
        assert "RG3_J2KR.dcm" in out.stdout and "pylibjpeg-openjpeg" in out.stdout


class TestPatientKey:
    def test_salted_and_falls_back_to_study(self, tmp_path):
        p = write_gray(tmp_path / "a.dcm", np.ones((4, 4), np.uint16), bits=12)
        ds = pydicom.dcmread(p)
        k1, k2 = patients.patient_key(ds, "salt1", "a"), patients.patient_key(ds, "salt2", "a")
        assert k1 != k2 and "P1" not in k1
        ds.PatientID = ""
        ds.StudyInstanceUID = "1.2.3"
        k3 = patients.patient_key(ds, "salt1", "a")
        ds.StudyInstanceUID = "1.2.4"
        assert k3 != patients.patient_key(ds, "salt1", "a")


class TestBurnedInAnnotation:
    """(0028,0301) Burned In Annotation YES: refused by default, with the tag named; kept on request."""

    def test_refused_by_default_kept_on_request(self, tmp_path, synth_binary):
        from xray_dist.errors import BurnedInAnnotationError

        src = synth_binary.files[0]
        ds = pydicom.dcmread(src)
        ds.BurnedInAnnotation = "YES"
        path = tmp_path / "burned.dcm"
        ds.save_as(path)
        with pytest.raises(BurnedInAnnotationError, match=r"\(0028,0301\) Burned In Annotation is YES") as e:
            dicom.load_image(path, PreprocessSpec(image_size=32))
        assert e.value.kind == "burned_in_annotation" and str(path) in str(e.value)
        np.testing.assert_array_equal(dicom.load_image(path, PreprocessSpec(image_size=32, burned_in="keep")),
                                      dicom.load_image(src, PreprocessSpec(image_size=32)))
        ds.BurnedInAnnotation = "NO"
        ds.save_as(path)
        dicom.load_image(path, PreprocessSpec(image_size=32))  # NO: used

    def test_specs_from_before_keep_what_they_kept(self):
        old = PreprocessSpec.from_dict({"image_size": 64, "aspect": "pad", "storage_dtype": "uint8", "window": "first",
                                        "pipeline_version": 2})
        assert old.burned_in == "keep" and PreprocessSpec(image_size=64).burned_in == "reject"


@pytest.mark.parametrize("photometric,rescale", [("MONOCHROME1", {}), ("MONOCHROME2", {"RescaleSlope": 1,
                                                                                   "RescaleIntercept": 0}),
                                                 ("MONOCHROME2", {"RescaleSlope": 2, "RescaleIntercept": -100})])
def test_the_in_place_window_gives_the_formula_and_leaves_the_dataset_alone(tmp_path, photometric, rescale):
    """The window is applied in place on the decoder's float64 copy: the model input equals the
    PS3.3 formula computed here out of place, and the dataset's own pixel array (which a modality
    LUT of slope 1 may hand back as it is) is not touched."""
    from PIL import Image

    rng = np.random.default_rng(7)
    stored = rng.integers(0, 4096, (40, 30)).astype(np.uint16)
    path = write_gray(tmp_path / "w.dcm", stored, photometric, 16, BitsStored=12, WindowCenter=1500, WindowWidth=2000,
                      **rescale)
    ds = dicom.read_dataset(path)
    before = ds.pixel_array.copy()
    got = dicom.to_model_input(ds, PreprocessSpec(image_size=16), path)
    np.testing.assert_array_equal(ds.pixel_array, before)
    x = stored.astype(np.float64) * rescale.get("RescaleSlope", 1) + rescale.get("RescaleIntercept", 0)
    x = np.clip((x - (1500 - 0.5)) / (2000 - 1) + 0.5, 0.0, 1.0)
    x = 1.0 - x if photometric == "MONOCHROME1" else x
    square = np.zeros((40, 40), np.float32)
    square[:, 5:35] = x
    want = np.asarray(Image.fromarray(square, mode="F").resize((16, 16), Image.Resampling.BILINEAR), np.float32)
    np.testing.assert_array_equal(got, np.clip(np.rint(want * 255.0), 0, 255).astype(np.uint8))
