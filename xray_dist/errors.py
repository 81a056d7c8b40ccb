"""Typed errors that carry the file and the reason.

Every error here survives pickling between Ray processes (``__reduce__`` rebuilds it from its
arguments), so a worker's failure reaches the driver with its path and reason intact.
"""

from __future__ import annotations


class XrayDistError(Exception):
    """Base class for every error raised on purpose by xray-dist."""


class DicomReadError(XrayDistError):
    """A DICOM file could not be turned into a model input.

    ``kind`` is a short stable code (``not_dicom``, ``no_pixel_data``, ...) that reports group by;
    ``reason`` is the human sentence, naming the DICOM tag where one is at fault.
    """

    kind = "unreadable"

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # one line, whatever the decoder's message looked like
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


class NotDicomError(DicomReadError):
    kind = "not_dicom"


class RetrieveError(DicomReadError):
    """An archive's instance that could not be retrieved (a prepare run again tries it again)."""

    kind = "retrieve"


class NoPixelDataError(DicomReadError):
    kind = "no_pixel_data"


class UnsupportedImageError(DicomReadError):
    kind = "unsupported_image"


class MissingCodecError(DicomReadError):
    kind = "missing_codec"


class CorruptPixelDataError(DicomReadError):
    kind = "corrupt_pixel_data"


class TruncatedError(DicomReadError):
    """The file ends before the data its header declares (an element, or the pixel data, cut off)."""

    kind = "truncated"


class ImageTooLargeError(UnsupportedImageError):
    """(0028,0010) Rows × (0028,0011) Columns × frames × samples exceeds ``max_pixels``: refused
    from the header, before a byte of pixel data is decoded (a 1 KB file can claim 65535²)."""

    kind = "too_large"


class BurnedInAnnotationError(DicomReadError):
    """(0028,0301) Burned In Annotation is YES: text (names, IDs) may be part of the pixels."""

    kind = "burned_in_annotation"


class PrepareError(XrayDistError):
    """The inputs to ``prepare`` are unusable as a whole (nothing usable left, bad CSV, ...)."""


class CacheError(XrayDistError):
    """A cache directory is missing, incomplete or was made with other settings."""


class ModelSpecError(XrayDistError):
    """A model, checkpoint or weights file does not fit the requested architecture."""


class RunStopped(XrayDistError):
    """Whoever runs the training loop asked it to stop (a sweep scheduler stopped this trial)."""


class StorageError(XrayDistError):
    """A path or URI cannot be used: unknown scheme, unreachable object store, missing bucket, failed I/O."""


class LockedError(XrayDistError):
    """Another command is writing the same target (cache, run, sweep) right now."""


class ConfigError(XrayDistError, ValueError):
    """A configuration key or value that cannot be used; ``key`` names it, the message says what is
    allowed. A ``ValueError`` too, so callers that caught bad values before keep working."""

    def __init__(self, key: str, message: str):
        self.key = str(key)
        self.message = " ".join(str(message).split())  # one line
        super().__init__(self.message)

    def __reduce__(self):
        return (type(self), (self.key, self.message))
