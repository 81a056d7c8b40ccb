"""A hospital archive as a source: DICOMweb (QIDO-RS to search, WADO-RS to retrieve).

A source is written as a URI whose scheme is ``dicomweb+`` and the archive's DICOMweb root, with the
QIDO-RS search filters as its query::

    dicomweb+http://127.0.0.1:8042/dicom-web?Modality=CR&StudyDate=20240101-20241231

The driver searches the archive's instances with QIDO-RS, page by page until one comes back short
(:data:`PAGE`), and keeps only each instance's three UIDs; each is then named
``STUDY/SERIES/SOP.dcm`` inside the source, which is how labels find it (``--path-column
SOPInstanceUID``: a label cell is matched to the name's stem; ``StudyInstanceUID`` or
``SeriesInstanceUID``: every instance under it; ``AccessionNumber``: every instance of its studies,
the search then keeping each study's accession number in memory for the join) and how a rerun
recognises it. The
decode tasks retrieve each instance with WADO-RS in its stored transfer syntax (``*``), bytes in
memory, and decode them exactly as a file's bytes are decoded. The UIDs can identify a patient's
study, so a cache made from a DICOMweb source names its images by salted keys (``--redact-paths``
is implied; ``--path-map`` keeps key → UIDs where the user wants it).

Credentials come from the environment only — :data:`TOKEN_ENV` (a bearer token) or
:data:`USER_ENV` and :data:`PASSWORD_ENV` (basic) — ride on the HTTP session (never in a URL, a
header dict the client logs, a log line or a file) and are handed to the decode tasks as an
argument, as the patient-key salt is. A URI that carries ``user:password@`` is refused. TLS is
verified (:data:`CA_ENV` names a CA bundle). Every request has a timeout (:data:`TIMEOUT_S`) and is
retried with exponential backoff on 408/429/500/502/503/504 (:data:`ATTEMPTS` attempts in all); at
most ``--dicomweb-connections`` decode tasks retrieve at once, so a prepare cannot flood a clinical
archive.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from xray_dist.errors import PrepareError
from xray_dist.infra.files import FileEntry

SCHEME = "dicomweb+"
TOKEN_ENV = "XRAY_DIST_DICOMWEB_TOKEN"
USER_ENV = "XRAY_DIST_DICOMWEB_USER"
PASSWORD_ENV = "XRAY_DIST_DICOMWEB_PASSWORD"
CA_ENV = "XRAY_DIST_DICOMWEB_CA_BUNDLE"
#: Instances per QIDO-RS page.
PAGE = 500
#: Seconds to connect, and to wait for a response.
TIMEOUT_S = (5.0, 60.0)
ATTEMPTS = 4
RETRIED = (408, 429, 500, 502, 503, 504)
#: Decode tasks retrieving from one archive at once (``--dicomweb-connections``).
CONNECTIONS = 4
_UID = re.compile(r"^[0-9.]{1,64}$")

# dicomweb_client logs each request's URL and headers at DEBUG and each instance's UIDs at INFO (which
# can identify a study): only its warnings reach our logs
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)


def is_source(location) -> bool:
    return str(location).lower().startswith(SCHEME)


@dataclass(frozen=True)
class Credentials:
    """What the archive is asked with; its text form never shows a secret."""

    token: str | None = field(default=None, repr=False)
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_bundle: str | None = None

    @classmethod
    def from_env(cls) -> "Credentials":
        return cls(os.environ.get(TOKEN_ENV) or None, os.environ.get(USER_ENV) or None,
                   os.environ.get(PASSWORD_ENV) or None, os.environ.get(CA_ENV) or None)

    def secrets(self) -> list[str]:
        return [s for s in (self.token, self.password) if s]


@dataclass(frozen=True)
class Source:
    """A parsed ``dicomweb+…`` URI: the archive's DICOMweb root and the QIDO-RS filters."""

    root: str  # http(s)://host[:port]/path, no query
    filters: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, uri: str) -> "Source":
        if not is_source(uri):
            raise PrepareError(f"{uri}: not a DICOMweb source (expected dicomweb+https://HOST/ROOT?FILTER=VALUE...)")
        parts = urllib.parse.urlsplit(str(uri)[len(SCHEME):])
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PrepareError(f"{redacted(uri)}: a DICOMweb source is dicomweb+http(s)://HOST[:PORT]/ROOT[?QIDO "
                               "filters]")
        if parts.username or parts.password:
            raise PrepareError(f"{redacted(uri)}: credentials never go in the URI; set {TOKEN_ENV}, or {USER_ENV} "
                               f"and {PASSWORD_ENV}")
        try:
            _ = parts.port
        except ValueError:
            raise PrepareError(f"{redacted(uri)}: the port is not a number") from None
        root = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        return cls(root, tuple(urllib.parse.parse_qsl(parts.query, keep_blank_values=True)))

    @property
    def uri(self) -> str:
        query = urllib.parse.urlencode(self.filters)
        return SCHEME + self.root + (f"?{query}" if query else "")


def redacted(uri: str) -> str:
    """``uri`` with any ``user:password@`` replaced, for messages."""
    return re.sub(r"//[^/@]*@", "//<credentials>@", str(uri))


def instance_name(study: str, series: str, sop: str) -> str:
    return f"{study}/{series}/{sop}.dcm"


def location(source_uri: str, name: str) -> str:
    """Where an instance named ``name`` lives (the archive's root and its UIDs; no query): what
    errors name before they are scrubbed, and a header without a patient falls back to."""
    return SCHEME + Source.parse(source_uri).root + "/" + name


class _ArchiveSession(requests.Session):
    """A session whose own CA bundle (:data:`CA_ENV`) is the one used: requests lets a machine-wide
    ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE`` replace a session's ``verify`` on every request
    (``merge_environment_settings``), which silently ignored the archive's private CA wherever
    those are set (they are on this project's machines). Proxies from the environment still apply."""

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if isinstance(self.verify, str) and verify in (None, True):
            settings["verify"] = self.verify
        return settings


def _session(creds: Credentials, as_stored: bool = False) -> requests.Session:
    class _Bearer(requests.auth.AuthBase):
        def __call__(self, r):
            r.headers["Authorization"] = f"Bearer {creds.token}"
            return r

    s = _ArchiveSession()
    if as_stored:  # instances, not gzipped: requests asks for gzip by default, and Orthanc then
        # compresses each one on the archive's CPU (BENCHMARKS.md, DICOMweb), for a quarter off the
        # bytes of raw pixels and nothing off JPEG 2000
        s.headers["Accept-Encoding"] = "identity"
    if creds.token:
        s.auth = _Bearer()
    elif creds.user:
        s.auth = (creds.user, creds.password or "")
    s.verify = creds.ca_bundle or True
    return s


def client(source: Source, creds: Credentials, as_stored: bool = False):
    """A DICOMweb client for ``source`` with ``creds`` on its session, timeouts and retries;
    ``as_stored``: answers not content-coded (for retrieves: instances are already as small as
    their transfer syntax makes them, and compressing them costs the archive's CPU)."""
    c = DICOMwebClient(source.root, session=_session(creds, as_stored), timeout=TIMEOUT_S)
    c.set_http_retry_params(retry=True, max_attempts=ATTEMPTS, wait_exponential_multiplier=250,
                            retriable_error_codes=tuple(HTTPStatus(s) for s in RETRIED))
    return c


def _status(e: BaseException) -> int | None:
    """The HTTP status behind a failed request: requests' error, or the last answer the client's
    retries gave up on (``retrying.RetryError``)."""
    response = getattr(e, "response", None)
    if response is None:
        response = getattr(getattr(e, "last_attempt", None), "value", None)
    return getattr(response, "status_code", None)


def transient(e: BaseException) -> bool:
    """Whether a failed request may succeed later: no connection, a timeout, or 408/429/5xx."""
    status = _status(e)
    if status is not None:
        return status in RETRIED
    return isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout))


class Unavailable(OSError):
    """An instance the archive could not hand over now (a later prepare tries it again)."""


def failure(source: Source, e: BaseException, creds: Credentials = Credentials()) -> str:
    """One line for a failed request: the HTTP status and what it means, never a secret."""
    status = _status(e)
    if status in (401, 403):
        why = (f"HTTP {status}: the archive refused the credentials (set {TOKEN_ENV}, or {USER_ENV} and "
               f"{PASSWORD_ENV})")
    elif status is not None:
        why = f"HTTP {status}"
    elif isinstance(e, requests.exceptions.SSLError):
        why = f"TLS verification failed (a private CA: {CA_ENV})"
    elif isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        why = "cannot reach the archive (connection refused or timed out)"
    else:
        why = f"{type(e).__name__}"
    text = f"{source.root}: {why}"
    for s in creds.secrets():
        text = text.replace(s, "***")
    return text


def _uid(item: dict, tag: str) -> str | None:
    v = (item.get(tag) or {}).get("Value") or [None]
    v = v[0]
    return v if isinstance(v, str) and _UID.match(v) else None


@dataclass
class Listing:
    """What a QIDO-RS search of a source keeps: its instances (:func:`list_instances`) and, when
    asked for, each Accession Number's studies (in memory only: an accession number can identify a
    patient's study, and it is used to join labels, never written)."""

    entries: list[FileEntry]
    studies_of_accession: dict[str, list[str]] = field(default_factory=dict)


def search_instances(source: Source, creds: Credentials, page: int = PAGE, accessions: bool = False) -> Listing:
    """Every instance the QIDO-RS search finds, paged until a page is empty or adds nothing, as
    entries named ``STUDY/SERIES/SOP.dcm`` (size and time 0: an instance's identity is its SOP
    Instance UID). Only the three UIDs are kept from each answer, and with ``accessions`` its study's
    Accession Number. A failed search is a :class:`PrepareError` naming the archive and the HTTP
    status (nothing has been written then)."""
    c = client(source, creds)
    fields = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"] + (["AccessionNumber"] if accessions else [])
    found: dict[str, FileEntry] = {}
    studies: dict[str, set[str]] = {}
    offset = 0
    while True:  # until a page is empty or adds nothing (an archive that caps pages, or ignores offset)
        try:
            items = c.search_for_instances(search_filters=dict(source.filters), limit=page, offset=offset,
                                           fields=fields)
        except Exception as e:  # noqa: BLE001 - requests' and the client's errors: one line
            raise PrepareError(f"DICOMweb search failed: {failure(source, e, creds)}") from None
        before = len(found)
        for item in items:
            uids = [_uid(item, t) for t in ("0020000D", "0020000E", "00080018")]
            if all(uids):
                name = instance_name(*uids)
                found[name] = FileEntry(name, 0, 0)
                accession = _text(item, "00080050") if accessions else None
                if accession:
                    studies.setdefault(accession, set()).add(uids[0])
        if not items or len(found) == before:
            break
        offset += len(items)
    return Listing([found[k] for k in sorted(found)], {a: sorted(v) for a, v in studies.items()})


def list_instances(source: Source, creds: Credentials, page: int = PAGE) -> list[FileEntry]:
    """The instances :func:`search_instances` finds."""
    return search_instances(source, creds, page).entries


def _text(item: dict, tag: str) -> str | None:
    """A string attribute of a QIDO-RS answer (DICOM JSON), stripped; None when absent or empty."""
    v = ((item.get(tag) or {}).get("Value") or [None])[0]
    return (v.strip() or None) if isinstance(v, str) else None


def read_location(location: str, creds: Credentials | None = None) -> bytes:
    """The instance at ``location`` (:func:`location`: the root, then ``STUDY/SERIES/SOP.dcm``)."""
    head, study, series, sop = str(location).rsplit("/", 3)
    return retrieve(head, f"{study}/{series}/{sop}", creds or Credentials.from_env())


_THREAD = threading.local()


def retrieve(source_uri: str, name: str, creds: Credentials) -> bytes:
    """The instance ``STUDY/SERIES/SOP.dcm`` of ``source_uri`` as stored (WADO-RS, any transfer
    syntax), as the bytes of a DICOM file; one client per source and thread (a requests session
    is not promised to be thread-safe; predict's local engine retrieves from a few threads)."""
    source = Source.parse(source_uri)
    _clients = _THREAD.__dict__.setdefault("clients", {})
    key = (source.root, creds)
    if key not in _clients:
        _clients[key] = client(source, creds, as_stored=True)
    study, series, sop = name[: -len(".dcm")].split("/")
    for attempt in range(ATTEMPTS):  # the client retries answers; a refused connection or a timeout here
        try:
            ds = _clients[key].retrieve_instance(study, series, sop, media_types=(("application/dicom", "*"),))
            break
        except Exception as e:  # noqa: BLE001 - one line, no secret
            if not transient(e):
                raise OSError(f"WADO-RS retrieve failed: {failure(source, e, creds)}") from None
            if attempt == ATTEMPTS - 1 or _status(e) is not None:  # answers were retried by the client already
                raise Unavailable(f"WADO-RS retrieve failed: {failure(source, e, creds)}") from None
            time.sleep(0.25 * 2**attempt)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
