"""Infrastructure every stage stands on.

- :mod:`~xray_dist.infra.storage`: the one name for local paths and object stores, built from
  ``locations`` (what a path names, its filesystem), ``files`` (reads, whole writes, copies) and
  ``staging`` (outputs moved into place whole; directories replaced on object storage).
- :mod:`~xray_dist.infra.locks`: one writer per target (``s3lock``: S3's conditional writes).
- :mod:`~xray_dist.infra.runtime`: starting or joining Ray.
- :mod:`~xray_dist.infra.console`: the terminal and the log file (``worker_output``: what Ray's
  workers print); :mod:`~xray_dist.infra.redaction`: what no line or file may hold.
- :mod:`~xray_dist.infra.compat`: every private API of Ray and tf_keras, and the Ray version check.

May import: :mod:`xray_dist.errors` only (and the standard library, pyarrow, boto3, absl; Ray,
TensorFlow and tqdm lazily, where they are used).
"""
