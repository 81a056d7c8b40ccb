"""What no line printed or logged, and no file written, may hold: a credential in a URI and, with
``--redact-paths``, the locations of the inputs.

- :func:`mask_credentials` — always: a URI's user information (``http://user:password@host``)
  and the values of query or fragment parameters that carry secrets (``?token=``,
  ``access_token=``, ``X-Amz-Signature=``, ``password=``, ``sig=`` ...) become ``***``. The
  credential-bearing URI itself stays in memory where it is needed (the MLflow client talks to
  the server with it); what is written or logged is the masked one.
- :func:`protect` — the CLI registers, for a command run with ``--redact-paths``, each input
  location it was given (the data directory, the labels, metadata and split files, predict's and
  explain's inputs): the location as given, made absolute and with links resolved, becomes a
  placeholder (``<data>``, ``<labels>`` ...); the folder names on its way from the working
  directory that look like identity (a name, a record number) become ``<redacted>`` wherever
  they stand alone. Lower-case words (``images``, ``dicom``) and short numbers (a year) are
  layout, not identity, and stay: replacing them would garble lines such as "48 images".
- :func:`scrub` applies both; :mod:`xray_dist.infra.console` passes every terminal and log line
  through it, and the CLI its error line.

Names of single files inside an input are the business of :class:`xray_dist.data.paths.PathNames`
(the salted key of each file); this module keeps the inputs' own locations out of what is
printed and logged.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import PurePosixPath

from xray_dist.infra import storage

MASK = "***"
REDACTED = "<redacted>"

#: Query or fragment parameters whose value is a secret (matched inside the name, any case):
#: token, access_token, X-Amz-Security-Token, api_key, X-Amz-Credential, X-Amz-Signature,
#: Azure's sig, password, passwd, pwd, secret, client_secret, auth, authorization ...
_SECRET_PARAM = r"[\w.\-]*(?:token|key|secret|pass|pwd|sig|credential|auth|session)[\w.\-]*"
_QUERY = re.compile(rf"(?i)([?&;#]{_SECRET_PARAM}=)([^&#;\s'\"<>]*)")
#: scheme://userinfo@ — up to the last '@' of the authority (a password may hold an unencoded '@').
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^/\s'\"<>?#]*)@")

_lock = threading.Lock()
_forms: dict[str, str] = {}  # text to replace -> its placeholder
_pattern: re.Pattern | None = None


def mask_credentials(text: str | None) -> str | None:
    """``text`` with every URI's user information and secret-bearing parameters as ``***``."""
    if not text or ("@" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@" if m.group(2) else m.group(0), text)
    return _QUERY.sub(lambda m: m.group(1) + (MASK if m.group(2) else ""), text)


def has_credentials(text: str | None) -> bool:
    return bool(text) and mask_credentials(text) != text


def _identifying(name: str) -> bool:
    """Whether a folder or file name may name a person or a record (``SMITH_JOHN``,
    ``MRN1234567``, ``1234567``, ``Doe Jane``) rather than a layout (``images``, ``2024``)."""
    if name.isdigit():
        return len(name) >= 6
    if len(name) < 4 or name.lower() in ("dicom", "images", "image", "data", "labels", "files", "train", "test"):
        return False
    return not re.fullmatch(r"[a-z_.\-]+", name)


def _forms_of(location: str) -> tuple[set[str], set[str]]:
    """(the location's full forms, the identifying names on its way)."""
    given = location.rstrip("/") or location
    if storage.is_uri(location):
        path = given.split("://", 1)[1]
        return {given}, {p for p in PurePosixPath(path).parts if _identifying(p)}
    full = {given, os.path.normpath(given), os.path.abspath(given), os.path.realpath(given)}
    cwd = os.getcwd()
    names = set()
    for absolute in (os.path.abspath(given), os.path.realpath(given)):
        try:
            below = os.path.relpath(absolute, os.path.commonpath([absolute, cwd]))
        except ValueError:
            below = absolute
        names |= {p for p in PurePosixPath(below).parts if p not in ("/", ".", "..") and _identifying(p)}
    return {f for f in full if f not in ("", ".", "..", "/")}, names


def protect(location: str, placeholder: str) -> None:
    """From now on, :func:`scrub` replaces ``location`` (in every form) by ``placeholder`` and
    the identifying folder names on its way by ``<redacted>``."""
    global _pattern
    full, names = _forms_of(str(location))
    with _lock:
        for n in names:
            _forms.setdefault(n, REDACTED)
        for f in full:
            _forms[f] = placeholder  # a full form wins over a name
        _pattern = None


def forget() -> None:
    """No location protected any more (the end of a command run inside another program)."""
    global _pattern
    with _lock:
        _forms.clear()
        _pattern = None


def protected() -> bool:
    return bool(_forms)


def _trie_regex(words) -> str:
    """One alternation of ``words`` as a trie (``a(?:b|c)``...): matching costs the text's length
    times the words' depth, not their number (predict may be given thousands of files)."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        alts = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return build(trie)


def _compiled() -> re.Pattern | None:
    global _pattern
    with _lock:
        if _pattern is None and _forms:
            # greedy, so the longest form wins (an absolute path before the folder name inside it);
            # a form stands alone: no letter or digit right before or after it
            # (a form of 400+ characters, rare, is its own alternative: the trie is built recursively)
            long = sorted((f for f in _forms if len(f) > 400), key=len, reverse=True)
            body = "|".join([*map(re.escape, long), _trie_regex(f for f in _forms if len(f) <= 400)])
            _pattern = re.compile(r"(?<![A-Za-z0-9])(?:" + body + r")(?![A-Za-z0-9])")
        return _pattern


def scrub(text: str) -> str:
    """``text`` with credentials masked and protected locations replaced."""
    if not text:
        return text
    text = mask_credentials(text)
    pattern = _compiled()
    if pattern is None:
        return text
    return pattern.sub(lambda m: _forms.get(m.group(0), REDACTED), text)


def mask_values(text: str) -> str:
    """``text`` with every quoted value replaced by ``'…'``: pydicom quotes the offending element's
    value in its messages, and that element may be a name or a birth date."""
    return re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
