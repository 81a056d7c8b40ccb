"""How outputs name input files.

File paths often carry names or record numbers (``/data/SMITH_JOHN/1234567/chest.dcm``), so what
xray-dist writes — the cache, the prepare report, run metrics, the HTML report, predict and
explain outputs, its log lines — never holds an input's absolute path:

- ``relative`` (the default): a file is named by its path relative to the input it was found
  under — the data directory for ``prepare``, the directory or prefix given to ``predict`` /
  ``explain`` (a file given by itself: as given when relative, else its file name). Predicting
  over a prepared data directory therefore names files as the cache does.
- ``redact`` (``--redact-paths``): a file is named ``f_`` + a salted hash of that relative path,
  and the data directory and labels file are not recorded. The salt is the patient-key salt
  (:mod:`xray_dist.data.salt`: ``XRAY_DIST_SALT``, else ``--salt-file``, else the per-user
  secret): the same file gets the same key in the cache, in ``predict`` and in ``explain``
  outputs, and keys cannot be reversed without it. ``--path-map FILE`` writes key → path to a
  file of the user's choosing, never beside the outputs.

Error messages from decoders can quote a path (an ``OSError`` does); :meth:`PathNames.scrub`
replaces it with the file's name before a reason is stored or logged.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import PurePosixPath

from xray_dist.infra import storage

RELATIVE, REDACT = "relative", "redact"
NOT_RECORDED = "(not recorded: --redact-paths)"


@dataclass(frozen=True)
class PathNames:
    """The naming policy of one command: :data:`RELATIVE` or :data:`REDACT` (with its salt)."""

    policy: str = RELATIVE
    salt: str = ""

    def __post_init__(self):
        if self.policy not in (RELATIVE, REDACT):
            raise ValueError(f"path policy must be {RELATIVE!r} or {REDACT!r}. Received: {self.policy!r}")
        if self.policy == REDACT and not self.salt:
            raise ValueError("redacted paths need a salt")

    @property
    def redact(self) -> bool:
        return self.policy == REDACT

    def name(self, rel: str) -> str:
        """How outputs name the file at ``rel`` (relative to its input)."""
        if not self.redact:
            return rel
        return "f_" + hashlib.sha256((self.salt + "\x00path:" + rel).encode()).hexdigest()[:16]

    def location(self, where: str) -> str:
        """How outputs record an input location (data directory, labels file)."""
        return NOT_RECORDED if self.redact else where

    def scrub(self, text: str, full: str, rel: str) -> str:
        """``text`` (an error message) with the file's path — absolute, relative, or its file name
        when redacting — replaced by the file's name."""
        shown = self.name(rel)
        for s in sorted({str(full), rel, *([PurePosixPath(rel).name] if self.redact else [])}, key=len, reverse=True):
            if s and s != shown:
                text = text.replace(s, shown)
        return text


def named_inputs(inputs: list[str], files_of) -> tuple[list[str], list[str]]:
    """``(files, rels)`` for command-line inputs: ``files_of(item)`` lists a directory's or prefix's
    files as paths relative to it (``None`` for a single file); each file's rel is that path; a
    file given by itself keeps a relative path as given, an absolute one or a URI its file name."""
    files, rels = [], []
    for item in inputs:
        inside = files_of(item)
        if inside is None:
            files.append(item)
            rels.append(item if not storage.is_uri(item) and not PurePosixPath(item).is_absolute()
                        else storage.name(item))
        else:
            files += [storage.join(item, r) for r in inside]
            rels += list(inside)
    return files, rels


def write_path_map(path: str, files: list[str], rels: list[str], names: PathNames) -> None:
    """``key,path`` for every input (only where the user asked, with ``--path-map``)."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["key", "path"])
    w.writerows(sorted({(names.name(r), f) for f, r in zip(files, rels)}))
    storage.write_text(path, buf.getvalue())
