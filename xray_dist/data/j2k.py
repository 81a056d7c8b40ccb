"""JPEG 2000 at reduced resolution: decode only the wavelet levels the model input needs.

A JPEG 2000 codestream holds the image as a pyramid: decoding with OpenJPEG's *reduce* factor
``r`` (``opj_set_decoded_resolution_factor``, reached here through Pillow's ``Image.reduce``)
stops ``r`` levels early and returns the low-pass image at ``1/2^r`` of the size, for a fraction of
the work. A 2048 px radiograph going to a 224 px model input is decoded at ``r = 2`` (512 px), not
in full as pydicom decodes it.

The fast path is taken only where it is valid — otherwise :func:`decode_reduced` returns None and
the caller decodes in full with pydicom:

- transfer syntax JPEG 2000 (lossless or lossy, ``1.2.840.10008.1.2.4.90/.91``), one frame,
  (0028,0002) *Samples per Pixel* 1, unsigned (0028,0103) = 0, 8 to 16 bits stored;
- (0028,1050)/(0028,1051) *Window Center/Width* or a (0028,3010) *VOI LUT Sequence* fixes the
  intensity range: without them the range is the image's own min–max, which a low-pass image
  narrows, so every pixel would shift;
- the reduced image covers the model input twice over (:data:`OVERSAMPLE`):
  ``max(rows, cols) >> r >= 2 · image_size``, so the final antialiased resize still shrinks by 2×
  or more, and ``r`` is at most the codestream's decomposition levels. Stopping at exactly the
  model size skips that resize, and the wavelet low-pass alone differs from it at sharp edges:
  on synthetic phantoms (512 px → 32 / 64 / 224 px) the mean difference from a full decode was
  2.9 / 1.7 / 1.0 grey levels at 1× and 1.5 / 0.7 / 0 at 2×;
- the decoder returns the size OpenJPEG promises (``ceil(n / 2^r)``); if Pillow fails at ``r``
  (it does on some odd-sized codestreams), the next smaller ``r`` is tried.

Pillow returns more-than-8-bit samples scaled to 16 bits; they are shifted back by
``16 - BitsStored`` (exact: full-resolution decodes equal pydicom's bit for bit, a test checks).
The reduced image is the wavelet low-pass band, close to an area average; the model inputs it
gives match the full decode's within a tolerance stated and tested in ``tests/test_dicom.py``
and measured in ``bench/run.py``.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

log = logging.getLogger(__name__)

J2K_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}

#: The reduced image is at least this many times the model input (see the module docstring).
OVERSAMPLE = 2


def codestream(ds: Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def decomposition_levels(cs: bytes) -> int:
    """Number of wavelet decomposition levels from the COD marker segment (0 if not found)."""
    i = cs.find(b"\xff\x52")
    return cs[i + 9] if i >= 0 and i + 9 < len(cs) else 0


def precision(cs: bytes) -> int:
    """Bit depth of the first component from the SIZ marker segment (0 if not found)."""
    i = cs.find(b"\xff\x51")
    return (cs[i + 40] & 0x7F) + 1 if i >= 0 and i + 40 < len(cs) else 0


def reduce_factor(rows: int, cols: int, image_size: int, levels: int) -> int:
    """The largest ``r <= levels`` with ``max(rows, cols) >> r >= image_size``."""
    r = 0
    while r < levels and max(rows, cols) >> (r + 1) >= image_size:
        r += 1
    return r


def fast_path_applies(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "")) if meta is not None else ""
    return (syntax in J2K_SYNTAXES and int(ds.get("NumberOfFrames", 1) or 1) == 1
            and int(ds.get("SamplesPerPixel", 1)) == 1 and int(ds.get("PixelRepresentation", 0)) == 0
            and 8 <= int(ds.get("BitsStored", 0) or 0) <= 16 and "PixelData" in ds
            and (("WindowCenter" in ds and "WindowWidth" in ds) or len(ds.get("VOILUTSequence", [])) > 0))


def decode_reduced(ds: Dataset, image_size: int) -> np.ndarray | None:
    """Stored values at the lowest resolution that covers ``OVERSAMPLE × image_size``; None where the
    fast path does not apply or would not save anything (then decode in full)."""
    if not fast_path_applies(ds):
        return None
    rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsStored)
    try:
        cs = codestream(ds)
    except Exception:  # noqa: BLE001 - malformed encapsulation: the full decoder reports it properly
        return None
    if precision(cs) != bits:
        return None  # Pillow's 16-bit scaling follows the codestream; keep the shift exact
    r = reduce_factor(rows, cols, OVERSAMPLE * image_size, decomposition_levels(cs))
    while r > 0:
        expected = (-(-rows // (1 << r)), -(-cols // (1 << r)))
        try:
            im = Image.open(io.BytesIO(cs))
            im.reduce = r
            im.load()
            arr = np.asarray(im)
        except Exception as e:  # noqa: BLE001 - Pillow's decoder fails on some codestreams at some r
            log.debug("reduced JPEG 2000 decode failed at r=%d (%s); trying r=%d", r, e, r - 1)
            r -= 1
            continue
        if arr.shape != expected:
            return None
        if arr.dtype == np.uint16 and bits < 16:
            arr = arr >> (16 - bits)
        return arr.astype(np.uint16 if bits > 8 else np.uint8)
    return None
