"""Infrastructure every stage stands on: storage (local paths and object stores), locks, the Ray runtime, the
console and log file, redaction of identifying text, and the one module that touches private APIs of Ray and
tf_keras (:mod:`xray_dist.infra.compat`).

May import: :mod:`xray_dist.errors` only (and the standard library, pyarrow, boto3, Ray lazily).
"""
