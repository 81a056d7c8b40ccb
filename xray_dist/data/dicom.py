"""One DICOM file → one model input: a square ``uint8`` image, 0 = black, 255 = white.

The order of operations is the one PS3.3 prescribes for grayscale display and is enforced in
:func:`to_model_input`:

1. stored values, decoded from any supported transfer syntax (:func:`stored_values`);
2. Modality LUT, or (0028,1053) *Rescale Slope* / (0028,1052) *Rescale Intercept* — PS3.3 C.11.1
   (:func:`modality_values`);
3. VOI LUT (0028,3010) or (0028,1050) *Window Center* / (0028,1051) *Window Width* with
   (0028,1056) *VOI LUT Function* — PS3.3 C.11.2 — the first one when several are given;
   without any VOI the modality values are scaled min–max (:func:`voi_unit_range`);
4. MONOCHROME1 inverted, so that higher always means denser/brighter — PS3.3 C.7.6.3.1.2
   (:func:`to_model_input`); (2050,0020) *Presentation LUT Shape* is not applied on top, since
   for MONOCHROME1/2 objects it only restates the photometric interpretation;
5. [0, 1] → padded to a square with black (aspect policy ``pad``) → resized with an antialiased
   bilinear filter → ``round(x * 255)`` as ``uint8`` (:func:`resize_square`).

Policies for everything that is not a single grayscale frame:

- colour (RGB, YBR_*, PALETTE COLOR): converted to RGB (palette through its LUT) and reduced to
  luminance with ITU-R BT.601 weights, scaled by the stored bit depth; no VOI is applied.
- multi-frame (0028,0008) *Number of Frames* > 1: rejected (:class:`UnsupportedImageError`);
  a radiograph is one projection per file, and picking one frame silently would hide data.
- no (7FE0,0010) *Pixel Data* (SR, KOS, presentation states, ...): :class:`NoPixelDataError`.
- not a DICOM Part 10 file (no ``DICM`` preamble): :class:`NotDicomError`; files are never read
  with ``force=True``.
- a transfer syntax whose decoder plugin is not installed: :class:`MissingCodecError` naming the
  packages to install.
- a file that ends before the data its header declares — an element cut off, or a header that
  describes an image ((0028,0010) *Rows*, (0028,0011) *Columns*) but ends before (7FE0,0010)
  *Pixel Data*: :class:`TruncatedError` (``truncated``).
- more than ``max_pixels`` declared (Rows × Columns × frames × samples per pixel): refused from the
  header before any pixel is decoded, :class:`ImageTooLargeError` (``too_large``).
- a codec that fails on the pixel data: :class:`CorruptPixelDataError`.
- a (0028,1056) *VOI LUT Function* other than ``LINEAR``, ``LINEAR_EXACT`` or ``SIGMOID``:
  :class:`UnsupportedImageError`; a window width that function cannot use (``LINEAR`` under 1,
  the others 0 or less): :class:`CorruptPixelDataError` — what pydicom's ``apply_windowing``
  refuses, never read as ``LINEAR`` or turned into NaN pixels.

Patient keys are :mod:`xray_dist.data.patients`'; reading a file for the cache is
:mod:`xray_dist.data.decode`'s.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder

from xray_dist.config import DEFAULT_MAX_PIXELS, PreprocessSpec
from xray_dist.data import dicomweb
from xray_dist.data.j2k import decode_reduced
from xray_dist.errors import (
    BurnedInAnnotationError,
    CorruptPixelDataError,
    DicomReadError,
    ImageTooLargeError,
    MissingCodecError,
    NoPixelDataError,
    NotDicomError,
    TruncatedError,
    UnsupportedImageError,
)
from xray_dist.infra import storage
from xray_dist.infra.redaction import mask_values

_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR"}
_GRAY = {"MONOCHROME1", "MONOCHROME2"}


def read_dataset(path: str | Path, data: bytes | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 creds: "dicomweb.Credentials | None" = None) -> Dataset:
    """Read a DICOM Part 10 file and check that it holds exactly one decodable image frame of at
    most ``max_pixels`` pixels, and that nothing in it was cut off.

    ``data``: the file's bytes when the caller has fetched them already (``path`` then only names
    the file in errors). ``creds``: an archive's credentials when they are not this process's
    environment's (predict's Ray decode tasks get the driver's)."""
    path = str(path)
    try:
        if data is None and dicomweb.is_source(path):  # an archive's instance (predict, explain): WADO-RS
            data = dicomweb.read_location(path, creds)
        elif data is None:
            data = storage.read_bytes(path)  # local file or object: decoded from memory either way
    except (FileNotFoundError, IsADirectoryError):
        raise DicomReadError(path, "file not found") from None
    except Exception as e:  # noqa: BLE001 - an unreadable object is this file's failure, not the run's
        raise DicomReadError(path, f"could not read the file: {e}") from None
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError as e:
        raise NotDicomError(path, f"not a DICOM Part 10 file ({e})") from None
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad file, reported with its cause
        raise DicomReadError(path, f"could not parse the DICOM header: {type(e).__name__}: "
                                   f"{mask_values(str(e))}") from None
    with named_failures(path, "the DICOM header"):
        _check_whole(ds, path, len(data))
        _check_image(ds, path, max_pixels)
    return ds


def _check_whole(ds: Dataset, path: str, size: int) -> None:
    """pydicom keeps whatever bytes are left when a file ends inside an element (a shorter value,
    no error): an element whose value is shorter than its declared length was cut off. Elements
    are read raw (``Dataset.elements``), so nothing is decoded to find out."""
    for elem in ds.elements():
        if (isinstance(elem, RawDataElement) and elem.length != 0xFFFFFFFF and elem.value is not None
                and len(elem.value) < elem.length):
            raise TruncatedError(path, f"truncated: the file ({size} bytes) ends inside {elem.tag} "
                                       f"({len(elem.value)} of its {elem.length} bytes)")


@contextmanager
def named_failures(path: str | Path, what: str):
    """Any failure inside becomes this file's :class:`DicomReadError` with the cause (pydicom
    converts values lazily, so an invalid IS such as ``'1A'`` raises a bare ValueError wherever it
    is first read): one line naming the file, never a traceback."""
    try:
        yield
    except DicomReadError:
        raise
    except Exception as e:  # noqa: BLE001 - a bad value is this file's failure, not the run's
        raise DicomReadError(str(path), f"unreadable value in {what}: {type(e).__name__}: "
                                        f"{mask_values(str(e))}") from None


def _check_image(ds: Dataset, path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Exactly one decodable image frame of at most ``max_pixels``, or the reason there is not."""
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        sop = getattr(ds, "SOPClassUID", None)
        what = f"SOP Class {sop.name}" if sop is not None else "object"
        if other:
            raise UnsupportedImageError(path, f"(7FE0,0008/0009) {other[0]} is not a radiograph")
        if "Rows" in ds and "Columns" in ds:
            raise TruncatedError(path, "truncated: the header describes an image ((0028,0010) Rows, (0028,0011) "
                                       "Columns) but the file ends before (7FE0,0010) Pixel Data")
        raise NoPixelDataError(path, f"no (7FE0,0010) Pixel Data: {what} is not an image")

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    declared = rows * cols * max(frames, 1) * samples
    if frames > 1:
        raise UnsupportedImageError(
            path, f"multi-frame image ((0028,0008) Number of Frames = {frames}); one projection per file is expected"
        )
    if declared > max_pixels:  # before any pixel is decoded: a 1 KB header can claim gigabytes
        nbytes = declared * max(1, -(-int(ds.get("BitsAllocated", 8) or 8) // 8))
        raise ImageTooLargeError(path, f"declares {rows} x {cols} pixels x {frames} frame(s) x {samples} sample(s) "
                                       f"({declared / 1e6:.0f} MP, {nbytes / 2**30:.1f} GiB to decode), more than "
                                       f"--max-pixels {max_pixels}")
    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    if pi not in _GRAY | _COLOUR:
        raise UnsupportedImageError(path, f"(0028,0004) Photometric Interpretation {pi!r} is not supported")

    tsuid = ds.file_meta.get("TransferSyntaxUID")
    if tsuid is None:
        raise DicomReadError(path, "no (0002,0010) Transfer Syntax UID in the file meta information")
    decoder = get_decoder(tsuid)
    if decoder is None:
        raise UnsupportedImageError(path, f"transfer syntax {tsuid.name} ({tsuid}) has no pixel decoder")
    if not decoder.is_available:
        hint = _CODEC_PACKAGES.get(str(tsuid), "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle")
        raise MissingCodecError(path, f"no installed decoder for {tsuid.name} ({tsuid}); install it with: "
                                      f"pip install {hint}")


# Which pylibjpeg plugin decodes each compressed transfer syntax (for MissingCodecError's hint).
_CODEC_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",
}


def stored_values(ds: Dataset, path: str | Path, reduce_to: int | None = None) -> np.ndarray:
    """Step 1: the decoded stored values of the single frame (signedness per (0028,0103)).

    With ``reduce_to``, JPEG 2000 files are decoded only down to the resolution level that still
    covers a ``reduce_to`` px model input (:mod:`xray_dist.data.j2k`) where that is valid.
    """
    if reduce_to:
        arr = decode_reduced(ds, reduce_to)
        if arr is not None:
            return arr
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - codec or length failures are all corrupt pixel data
        raise CorruptPixelDataError(str(path), f"pixel data could not be decoded: {type(e).__name__}: {e}") from None
    return np.asarray(arr)


def modality_values(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Step 2, PS3.3 C.11.1: Modality LUT Sequence, else ``slope * stored + intercept``."""
    if "ModalityLUTSequence" in ds or "RescaleSlope" in ds or "RescaleIntercept" in ds:
        y = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        return y.copy() if np.may_share_memory(y, arr) else y  # always an array of our own (windowed in place)
    return arr.astype(np.float64)


#: The VOI LUT Functions PS3.3 C.11.2.1.3 defines (those pydicom's ``apply_windowing`` knows).
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


def apply_window(x: np.ndarray, center: float, width: float, function: str = "LINEAR",
                 inplace: bool = False) -> np.ndarray:
    """PS3.3 C.11.2.1.2 window to the output range [0, 1].

    ``LINEAR`` (C.11.2.1.2.1), ``LINEAR_EXACT`` (C.11.2.1.3.2) and ``SIGMOID`` (C.11.2.1.3.1): the
    formulas of pydicom's :func:`pydicom.pixels.apply_windowing`, scaled to [0, 1] instead of the
    stored bit depth's range, and refusing what it refuses (a :class:`ValueError`): another
    function, a ``LINEAR`` width under 1, a ``LINEAR_EXACT`` or ``SIGMOID`` width of 0 or less.
    ``inplace``: a float64 ``x`` the caller owns is overwritten for ``LINEAR`` (the same operations
    in the same order, so the same values, without three full-size temporaries).
    """
    function = (function or "LINEAR").upper()
    if function not in VOI_FUNCTIONS:
        raise ValueError(f"(0028,1056) VOI LUT Function {function!r} is not LINEAR, LINEAR_EXACT or SIGMOID")
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"SIGMOID window width must be > 0, got {width}")
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"LINEAR_EXACT window width must be > 0, got {width}")
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        raise ValueError(f"LINEAR window width must be >= 1, got {width}")
    if width == 1:  # degenerate: a threshold at the center
        return (x > center - 0.5).astype(np.float64)
    if inplace and x.dtype == np.float64:
        np.subtract(x, center - 0.5, out=x)
        np.divide(x, width - 1, out=x)
        np.add(x, 0.5, out=x)
        return np.clip(x, 0.0, 1.0, out=x)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _first(value) -> float:
    if isinstance(value, (list, tuple, MultiValue)):
        return float(value[0])
    return float(value)


def voi_function(ds: Dataset, path: str | Path) -> str:
    """(0028,1056) *VOI LUT Function*, upper-cased; ``LINEAR`` when absent or empty. A value PS3.3
    does not define is this file's :class:`UnsupportedImageError`, never read as ``LINEAR``."""
    fn = ds.get("VOILUTFunction", "LINEAR")
    fn = str((fn[0] if isinstance(fn, MultiValue) else fn) or "LINEAR").strip().upper()
    if fn not in VOI_FUNCTIONS:
        raise UnsupportedImageError(str(path), f"(0028,1056) VOI LUT Function {fn!r} is not LINEAR, LINEAR_EXACT "
                                               "or SIGMOID")
    return fn


def voi_unit_range(x: np.ndarray, ds: Dataset, path: str | Path) -> np.ndarray:
    """Step 3, PS3.3 C.11.2: VOI LUT or window to [0, 1]; without either, min–max of the image."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        item = ds.VOILUTSequence[0]
        try:
            # LUT indices are integers: modality values from integer stored values are whole numbers
            y = np.asarray(apply_voi_lut(np.rint(x).astype(np.int64), ds, index=0, prefer_lut=True), dtype=np.float64)
            bits = int(item.LUTDescriptor[2])
        except Exception as e:  # noqa: BLE001
            raise CorruptPixelDataError(str(path), f"(0028,3010) VOI LUT Sequence unusable: {e}") from None
        return np.clip(y / max(2**bits - 1, 1), 0.0, 1.0)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        fn = voi_function(ds, path)
        try:
            return apply_window(x, _first(ds.WindowCenter), _first(ds.WindowWidth), fn, inplace=True)  # x: ours
        except (ValueError, TypeError) as e:
            raise CorruptPixelDataError(
                str(path), f"(0028,1050) Window Center / (0028,1051) Window Width unusable: {e}"
            ) from None
    lo, hi = float(np.min(x)), float(np.max(x))
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float64)
    return (x - lo) / (hi - lo)


def colour_to_unit_gray(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Colour policy: RGB (YBR already converted by pydicom; palette through its LUT) → BT.601 luma."""
    pi = str(ds.PhotometricInterpretation)
    if pi == "PALETTE COLOR":
        rgb = np.asarray(apply_color_lut(arr, ds), dtype=np.float64)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    else:
        rgb = arr.astype(np.float64)
        bits = int(ds.get("BitsStored", 8))
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return np.clip(luma / (2**bits - 1), 0.0, 1.0)


def unit_gray(ds: Dataset, path: str | Path, reduce_to: int | None = None) -> np.ndarray:
    """Steps 1–4: the image in [0, 1], higher = denser/brighter, at its stored resolution (or
    JPEG 2000's reduced one, see :func:`stored_values`)."""
    arr = stored_values(ds, path, reduce_to)
    pi = str(ds.PhotometricInterpretation).strip()
    if pi in _COLOUR:
        if arr.ndim != 3 and pi != "PALETTE COLOR":
            raise CorruptPixelDataError(str(path), f"{pi} image decoded to shape {arr.shape}")
        return colour_to_unit_gray(arr, ds)
    if arr.ndim != 2:
        raise UnsupportedImageError(str(path), f"{pi} image decoded to shape {arr.shape}, expected rows x columns")
    x = voi_unit_range(modality_values(arr, ds), ds, path)
    if pi == "MONOCHROME1":
        x = np.subtract(1.0, x, out=x if x.dtype == np.float64 else None)
    return x


def resize_square(x: np.ndarray, size: int, full_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Step 5: pad the shorter side with black to a square, resize (antialiased bilinear), to uint8.

    ``full_shape``: ``x`` is a JPEG 2000 image decoded at reduction ``r`` from an image of this
    (rows, columns). Its low-pass samples sit on every ``2^r``-th full-resolution pixel, not at the
    centres a resize assumes, and the black padding of the full image is a fractional number of
    reduced pixels; the resize then samples exactly the region (in reduced coordinates) that the
    full image's square would cover, so both routes give the same model input up to the
    difference between the wavelet's low-pass and the resize's (:mod:`xray_dist.data.j2k`).
    """
    if full_shape is not None and full_shape != x.shape:
        return _resize_reduced(x, size, full_shape)
    h, w = x.shape
    side = max(h, w)
    if h != w:
        padded = np.zeros((side, side), dtype=np.float32)
        top, left = (side - h) // 2, (side - w) // 2
        padded[top : top + h, left : left + w] = x
        x = padded
    img = Image.fromarray(np.ascontiguousarray(x, dtype=np.float32), mode="F")
    if side != size:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    out = np.asarray(img, dtype=np.float32)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def _resize_reduced(x: np.ndarray, size: int, full_shape: tuple[int, int]) -> np.ndarray:
    r = int(round(np.log2(full_shape[0] / x.shape[0])))
    f = float(2**r)
    phase = 0.5 - 2.0 ** -(r + 1)
    side = max(full_shape)
    x = np.asarray(x, dtype=np.float32)
    offsets = [(side - n) // 2 for n in full_shape]
    # the full image's edge is clamped by the resize where it touches the square; padding is black
    x = np.pad(x, [(1, 1) if o == 0 else (0, 0) for o in offsets], mode="edge")
    margins = [1 if o == 0 else int(np.ceil(o / f)) + 2 for o in offsets]
    x = np.pad(x, [(0, 0) if o == 0 else (m, m) for o, m in zip(offsets, margins)])
    top, left = (m - o / f + phase for o, m in zip(offsets, margins))
    box = (left, top, left + side / f, top + side / f)
    img = Image.fromarray(np.ascontiguousarray(x), mode="F").resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.clip(np.rint(np.asarray(img, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def to_model_input(ds: Dataset, spec: PreprocessSpec, path: str | Path) -> np.ndarray:
    """The full pipeline for an already-read dataset: ``(size, size)`` uint8."""
    if spec.burned_in == "reject" and str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        raise BurnedInAnnotationError(str(path), "(0028,0301) Burned In Annotation is YES: the pixels may show names "
                                                 "or IDs; not used (prepare --keep-burned-in to use such images)")
    x = unit_gray(ds, path, spec.image_size if spec.j2k_reduce else None)
    full = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
    return resize_square(x, spec.image_size, full if x.ndim == 2 and full[0] > x.shape[0] else None)


def load_image(path: str | Path, spec: PreprocessSpec, creds: "dicomweb.Credentials | None" = None) -> np.ndarray:
    """Read ``path`` and return exactly what the model sees: ``(size, size)`` uint8 (``creds``: as
    :func:`read_dataset`'s)."""
    ds = read_dataset(path, max_pixels=spec.max_pixels, creds=creds)
    with named_failures(path, "the image"):
        return to_model_input(ds, spec, path)
