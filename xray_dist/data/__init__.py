"""From DICOM files to the prepared cache: reading and decoding one file (dicom, j2k), labels and their formats (labels; label_join
matches a labels file's rows to the files), subgroup attributes (subgroups),
the label schema (classes), patient keys (patients), path naming and the salt (paths, salt), splits, synthetic
cohorts (synth), the ``prepare`` stage (prepare, with its parallel decoding in decode), and the cache itself
(:mod:`xray_dist.data.cache` owns its layout and every reader; fingerprint pins it).

May import: :mod:`xray_dist.config`, :mod:`xray_dist.infra`, :mod:`xray_dist.errors`.
"""
