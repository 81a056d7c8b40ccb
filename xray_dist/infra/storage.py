"""Where every user path lives: a local directory or an object store, through one layer.

Every path a user gives (data, labels, caches, runs, sweeps, weights, inputs and outputs) is
either a local path or a URI (``s3://bucket/prefix``, ``gs://…``, ``abfs://…``), and every module
reads and writes it through the functions here, built on ``pyarrow.fs`` — the filesystem layer
Ray Train and Ray Data use themselves. A URI is never turned into a local directory: it is opened
with the filesystem its scheme names, or refused with :class:`~xray_dist.errors.StorageError`
(a one-line message naming the URI; the CLI exits 2).

S3 and S3-compatible servers (MinIO, moto, Ceph…) are configured as the AWS tools are:
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or an instance profile),
``AWS_REGION`` / ``AWS_DEFAULT_REGION``. The filesystem objects are built from those variables in
every process that needs one; credentials are never passed as arguments, so they are in no
config, log line, pickled filesystem or report (pyarrow pickles an S3 filesystem without
credentials it found in the environment). Connection and request timeouts are short and retries
few, so an unreachable endpoint fails in seconds, not in the SDK's minutes.

Writes are whole or absent: a local file is written under a temporary name and renamed; an object
is one PUT (or one multipart upload, which becomes visible only when it completes). A directory
whose completeness matters is uploaded with its marker file last (:func:`put_dir`); a command's
outputs are staged locally and moved into place whole (:func:`staged_output`).

This module is the one name every stage uses; the work is done in three modules below it:

- :mod:`xray_dist.infra.locations`: what a path names (local or URI), joining and splitting, and
  the pyarrow filesystem that opens it;
- :mod:`xray_dist.infra.files`: lookups, listings, reads, whole writes, deletes and copies;
- :mod:`xray_dist.infra.staging`: staged outputs, and directories replaced on object storage
  (versions beside them and a pointer, :func:`current_dir`).
"""

from xray_dist.infra.files import (FileEntry, content_sha256, csv_text, delete_dir, delete_file, dumps_json, exists,
                                   get_dir, info, is_dir, is_file, json_safe, list_dirs, list_files, local_copy,
                                   local_file, makedirs, open_input, put_dir, read_bytes, read_json, read_text,
                                   scratch_dir, upload_file, write_bytes, write_csv, write_json, write_parquet,
                                   write_text)
from xray_dist.infra.locations import (PUBLIC_ENV, absolute, check_location, contains, filesystem, inside, is_uri,
                                       join, name, parent, public_env, ray_storage)
from xray_dist.infra.staging import POINTER_SUFFIX, current_dir, staged_file, staged_output

__all__ = [
    "PUBLIC_ENV", "absolute", "check_location", "contains", "filesystem", "inside", "is_uri", "join", "name",
    "parent", "public_env", "ray_storage", "FileEntry", "content_sha256", "csv_text", "delete_dir", "delete_file",
    "dumps_json", "exists", "get_dir", "info", "is_dir", "is_file", "json_safe", "list_dirs", "list_files",
    "local_copy", "local_file", "makedirs", "open_input", "put_dir", "read_bytes", "read_json", "read_text",
    "scratch_dir", "upload_file", "write_bytes", "write_csv", "write_json", "write_parquet", "write_text",
    "POINTER_SUFFIX", "current_dir", "staged_file", "staged_output",
]
