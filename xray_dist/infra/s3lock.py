"""The target lock's object on S3 (:mod:`xray_dist.infra.locks`), changed only by conditional writes.

pyarrow has no conditional write, so the lock on an ``s3://`` target goes through boto3, configured
from the same environment as pyarrow (:mod:`xray_dist.infra.locations`: endpoint, region,
credentials, the same short timeouts and few retries): *create* is ``PutObject(IfNoneMatch="*")``,
*take over* and *heartbeat* are ``PutObject(IfMatch=<the ETag last seen>)``, *release* is
``DeleteObject(IfMatch=<own ETag>)``. ``412 PreconditionFailed`` or ``409
ConditionalRequestConflict`` means another writer won (:func:`lost_race`).
"""

from __future__ import annotations

import os
import threading

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from xray_dist.errors import StorageError
from xray_dist.infra.locations import S3_ATTEMPTS, S3_CONNECT_TIMEOUT, S3_REQUEST_TIMEOUT

_CLIENTS: dict[tuple, object] = {}
_CLIENTS_LOCK = threading.Lock()


def is_s3(path: str) -> bool:
    return path.split("://", 1)[0].lower() in ("s3", "s3a")


def lost_race(e: Exception) -> bool:
    """A conditional S3 write refused because another writer won (or the object is gone)."""
    if not isinstance(e, ClientError):
        return False
    code = str(e.response.get("Error", {}).get("Code", ""))
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404") \
        or status in (409, 412, 404)


def client():
    """A boto3 S3 client configured as :mod:`xray_dist.infra.locations` configures pyarrow: the endpoint,
    region and credentials of the environment, the same short timeouts and few retries."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    key = (endpoint, region)
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            config = Config(connect_timeout=S3_CONNECT_TIMEOUT, read_timeout=S3_REQUEST_TIMEOUT,
                            retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"})
            _CLIENTS[key] = boto3.session.Session().client("s3", endpoint_url=endpoint or None,
                                                           region_name=region or None, config=config)
        return _CLIENTS[key]


class S3Object:
    """One object (``s3://bucket/key``). Every call's failure other than a lost race is a
    :class:`StorageError` naming the object; a lost race is the SDK's ``ClientError``, raised."""

    def __init__(self, path: str):
        self.path = path
        self.bucket, _, self.key = path.split("://", 1)[1].partition("/")

    def _call(self, what: str, method: str, **kwargs):
        call = getattr(client(), method)
        try:
            return call(Bucket=self.bucket, Key=self.key, **kwargs)
        except Exception as e:  # noqa: BLE001 - botocore raises ClientError, EndpointConnectionError, ...
            if lost_race(e):
                raise
            raise StorageError(f"{self.path}: lock {what} failed: {' '.join(str(e).split())[:300]}") from None

    def get(self) -> tuple[bytes, str, float] | None:
        """``(content, ETag, Last-Modified as a timestamp)``, or None when there is no object."""
        try:
            r = self._call("read", "get_object")
        except Exception as e:  # noqa: BLE001 - only a lost race gets here
            if lost_race(e):
                return None
            raise
        return r["Body"].read(), r["ETag"], r["LastModified"].timestamp()

    def put(self, body: bytes, **condition) -> str:
        """A conditional PUT of ``body`` (``IfNoneMatch="*"`` or ``IfMatch=etag``); its ETag."""
        return self._call("write", "put_object", Body=body, ContentType="application/json", **condition)["ETag"]

    def delete(self, etag: str) -> None:
        """Delete the object if it is still the version ``etag``; another version is left alone."""
        try:
            self._call("release", "delete_object", IfMatch=etag)
        except Exception as e:  # noqa: BLE001 - another holder's now: leave it
            if not lost_race(e):
                raise
