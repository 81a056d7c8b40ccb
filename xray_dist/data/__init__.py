"""From DICOM files to the prepared cache: reading and decoding (dicom, j2k), labels and their formats, the label
schema (classes), patient keys and path naming (paths, salt), splits, synthetic cohorts, the ``prepare`` stage, and
the cache itself (:mod:`xray_dist.data.cache` owns its layout and every reader).

May import: :mod:`xray_dist.config`, :mod:`xray_dist.infra`, :mod:`xray_dist.errors`.
"""
