"""The terminal and the log file: what a person sees, and where the rest goes.

A command's terminal shows its stage lines, progress, Tune's table, warnings, errors and the
summary. Everything else — xray-dist's own detail, Ray's and TensorFlow's messages, what Ray
workers print (TensorFlow's C++ start-up lines, Ray-internal warnings), pydicom's warnings and
tracebacks — goes to the command's log file (``RUN/xray-dist.log`` for ``train``, the sweep's
or the demo's directory likewise; ``$XRAY_DIST_LOG_DIR`` or ``~/.cache/xray-dist/logs`` for
the others and for object-store outputs). ``-v`` shows it all on the terminal too; ``-q`` leaves
warnings, errors and the summary.

How: Python logging gets two handlers (terminal, file); Ray's driver-side printer of worker
output is replaced by a router that writes every worker line to the file and shows on the
terminal only the lines xray-dist's own code marked (:mod:`xray_dist.infra.worker_output`);
TensorFlow's C++ logging is turned down before TensorFlow loads (``TF_CPP_MIN_LOG_LEVEL``, here
and in every Ray worker). Long jobs show :class:`Progress`.

Everything written to the terminal or the log passes :func:`clean` first: pydicom's values
masked (its warnings quote the element they object to), credentials in URIs masked, and with
``--redact-paths`` the inputs' locations replaced (:mod:`xray_dist.infra.redaction`). The log
handlers clean each record as they format it; ``sys.stdout`` and ``sys.stderr`` are wrapped
for the command, so what is printed (Ray's worker lines with ``-v``, a summary) is cleaned too.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from xray_dist.infra import redaction, storage
from xray_dist.infra.redaction import mask_values

LOG_NAME = "xray-dist.log"
QUIET, NORMAL, VERBOSE = 0, 1, 2

_state: dict = {"verbosity": NORMAL, "log_file": None, "active": False, "at_finish": []}


def default_log_dir() -> Path:
    return Path(os.environ.get("XRAY_DIST_LOG_DIR") or Path.home() / ".cache" / "xray-dist" / "logs")


def log_path_for(command: str, out: str | None, in_out: bool) -> Path:
    """The log file of ``command``: inside ``out`` when the command owns that directory (a run, a
    sweep, the demo) and it is local; else a timestamped file in :func:`default_log_dir`."""
    if in_out and out and not storage.is_uri(out):
        return Path(out).resolve() / LOG_NAME
    return default_log_dir() / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def _mask_dicom(text: str) -> str:
    """pydicom's warnings and log lines quote the element value they object to (a name, a birth
    date, a UID with letters in it): each line of ``text`` that comes from pydicom (names it, or
    says "... for VR ...") keeps the message, not the value. A traceback's ``File "..."`` line
    stays as it is."""
    if "pydicom" not in text and "for VR " not in text:
        return text
    return "\n".join(mask_values(line) if ("pydicom" in line or "for VR " in line)
                     and not line.lstrip().startswith('File "') else line for line in text.split("\n"))


def clean(text: str, from_pydicom: bool = False) -> str:
    """What may be shown or logged of ``text``: pydicom's values masked (all of ``text`` when it
    is a pydicom record), then :func:`xray_dist.infra.redaction.scrub` (credentials in URIs; with
    ``--redact-paths`` the inputs' locations)."""
    if from_pydicom:
        text = mask_values(text)
    return redaction.scrub(_mask_dicom(text))


class _CleanFormatter(logging.Formatter):
    """Every record, traceback included, through :func:`clean` as it is written (terminal and
    log file alike): a record of pydicom's (its logger, or a warning it raised) masked whole."""

    def format(self, record: logging.LogRecord) -> str:
        return clean(super().format(record), record.name.startswith(("pydicom", "py.warnings")))


class _CleanStream:
    """``sys.stdout`` / ``sys.stderr`` during a command: what anything prints (the summary, Ray's
    printer of worker lines with -v, a library's own print) passes :func:`clean` first."""

    def __init__(self, stream):
        self._xray_dist_stream = stream

    def write(self, text: str) -> int:
        self._xray_dist_stream.write(clean(text) if isinstance(text, str) else text)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name):  # flush, isatty, fileno, encoding, buffer ...
        return getattr(self._xray_dist_stream, name)


def _clean_streams() -> None:
    for name in ("stdout", "stderr"):
        if not isinstance(getattr(sys, name), _CleanStream):
            setattr(sys, name, _CleanStream(getattr(sys, name)))


def _restore_streams() -> None:
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, _CleanStream):
            setattr(sys, name, stream._xray_dist_stream)


class _TerminalFilter(logging.Filter):
    """xray-dist's records at the terminal's level; other libraries' only from ERROR (all with -v)."""

    def __init__(self, verbosity: int):
        super().__init__()
        self.verbosity = verbosity

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbosity >= VERBOSE:
            return True
        if record.name.startswith(("pydicom", "py.warnings")):
            return False  # a bad file's warnings and tracebacks: xray-dist's own line names the file
        ours = record.name == "xray_dist" or record.name.startswith("xray_dist.")
        if ours:
            return record.levelno >= (logging.WARNING if self.verbosity <= QUIET else logging.INFO)
        return record.levelno >= logging.ERROR


class _LogFileHandler(logging.Handler):
    """The log file, opened once its directory exists. A run's or sweep's log lives in the
    directory the command makes: until the command has made it (a refused command never does),
    records wait in memory; if it never comes, they go to a file in :func:`default_log_dir` at
    the end, so a command's log is never lost and never makes a directory by itself."""

    LIMIT = 20000

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        self.stream = None
        self.pending: list[str] = []

    def _open(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.stream = open(path, "a", encoding="utf-8")
        for line in self.pending:
            self.stream.write(line)
        self.pending = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            if self.stream is None and self.path.parent.is_dir():
                self._open(self.path)
            if self.stream is None:
                if len(self.pending) < self.LIMIT:
                    self.pending.append(line)
                return
            self.stream.write(line)
            self.stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)

    def close(self) -> None:
        try:
            if self.stream is None and self.pending:
                fallback = default_log_dir() / f"{self.path.parent.name}-{os.getpid()}.log"
                self._open(fallback)
                _state["log_file"] = fallback
            if self.stream is not None:
                self.stream.close()
                self.stream = None
        except OSError:
            pass
        finally:
            super().close()


class StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record comes (not the stream of the
    moment it was made: a test's captured stream, or a stream a library swapped in, may be gone)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup(verbosity: int = NORMAL, log_file: Path | None = None) -> Path | None:
    """Configure this process's logging for a command (idempotent: a second call replaces it)."""
    _state["verbosity"] = verbosity
    _state["active"] = True
    if verbosity < VERBOSE:
        # before TensorFlow loads, here and (runtime.init_ray passes it on) in Ray's workers
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    root = _remove_handlers()
    root.setLevel(logging.DEBUG)
    _clean_streams()
    term = StderrHandler()
    term.setFormatter(_CleanFormatter("%(message)s" if verbosity < VERBOSE else
                                      "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    term.addFilter(_TerminalFilter(verbosity))
    term._xray_dist = True
    root.addHandler(term)
    _state["log_file"] = None
    if log_file is not None:
        fh = _LogFileHandler(log_file)
        fh.setFormatter(_CleanFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fh.setLevel(logging.DEBUG)
        fh._xray_dist = True
        root.addHandler(fh)
        _state["log_file"] = log_file
    logging.captureWarnings(True)  # pydicom's and other libraries' warnings: records, not stderr text
    for name in ("pydicom", "openjpeg", "py.warnings", "absl", "tensorflow", "h5py", "matplotlib", "PIL",
                 "urllib3", "botocore", "filelock", "asyncio"):
        lg = logging.getLogger(name)
        lg.handlers = [h for h in lg.handlers if not isinstance(h, logging.StreamHandler)]
        lg.propagate = True
    logging.getLogger("pydicom").setLevel(logging.DEBUG if verbosity >= VERBOSE else logging.WARNING)
    if "ray" in sys.modules:
        adopt_ray_loggers()
    for name in ("matplotlib", "PIL", "urllib3", "botocore", "filelock", "asyncio", "h5py"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return _state["log_file"]


def active() -> bool:
    """Whether a command set up this process's terminal (tests calling functions directly did not)."""
    return _state["active"]


def _remove_handlers() -> logging.Logger:
    """This module's handlers off the root logger (closed); returns the root logger."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_xray_dist", False):
            root.removeHandler(h)
            h.close()
    return root


def log_file() -> Path | None:
    return _state["log_file"]


def verbosity() -> int:
    return _state["verbosity"]


def adopt_ray_loggers() -> None:
    """Ray's loggers write through this process's handlers (file; terminal from ERROR, or all
    with -v) instead of their own stderr handler. Called after ``import ray`` (which configures
    them) and again after ``ray.init``."""
    import ray  # Ray: heavy, and loaded already where this runs; importing it sets up the handlers replaced here

    for name in (ray.__name__, "ray.data", "ray.tune", "ray.train", "ray.air"):
        lg = logging.getLogger(name)
        lg.handlers = [h for h in lg.handlers if not isinstance(h, logging.StreamHandler)
                       or getattr(h, "_xray_dist", False)]
        lg.propagate = True


def finish() -> None:
    """Undo :func:`setup` (the end of a command run inside another program, such as a test): what
    :func:`at_finish` was given undone first, while the log file is still open (the workers' last
    lines delivered to it, then Ray's printer of worker output back); then this module's handlers
    closed and removed."""
    undo, _state["at_finish"] = _state["at_finish"], []
    for fn in undo:
        fn()
    _remove_handlers().setLevel(logging.WARNING)
    logging.captureWarnings(False)
    _restore_streams()
    redaction.forget()
    _state.update({"active": False, "log_file": None, "verbosity": NORMAL})


def at_finish(fn) -> None:
    """Call ``fn()`` when :func:`finish` ends the command (a change of another layer's to undo)."""
    _state["at_finish"].append(fn)


def to_log_file(text: str) -> None:
    """``text`` to the log file only (its formatter cleans it: pydicom's values, credentials,
    protected locations)."""
    for h in logging.getLogger().handlers:
        if isinstance(h, _LogFileHandler):
            h.emit(logging.LogRecord("ray.worker", logging.INFO, __file__, 0, text, None, None))


class _LogStream:
    """A text stream whose lines go to the log file (``logger``, INFO)."""

    def __init__(self, logger: str):
        self.log = logging.getLogger(logger)
        self.buf = ""

    def write(self, text: str) -> int:
        self.buf += text
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            if line.strip():
                to_log_file(f"{self.log.name}: {line}")
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@contextmanager
def output_to_log(logger: str = "ray.tune.output"):
    """Inside: what a library prints to stdout goes to the log file (with -v, to the terminal as
    well: nothing is redirected). :func:`say` still reaches the terminal."""
    if not _state["active"] or _state["verbosity"] >= VERBOSE:
        yield
        return
    real = sys.stdout
    _state["terminal_out"] = real
    sys.stdout = _LogStream(logger)
    try:
        yield
    finally:
        sys.stdout = real
        _state["terminal_out"] = None


def say(text: str) -> None:
    """A line for the terminal (stdout), even inside :func:`output_to_log`; quiet mode drops it."""
    if _state["verbosity"] <= QUIET and _state["active"]:
        to_log_file(text)
        return
    print(text, file=_state.get("terminal_out") or sys.stdout, flush=True)


@contextmanager
def native_stderr_to_log():
    """Inside: what native code writes to file descriptor 2 (TensorFlow's C++ start-up lines,
    which no environment variable silences before absl is initialised) goes to the log file."""
    if not _state["active"] or _state["verbosity"] >= VERBOSE:
        yield
        return
    target = tempfile.TemporaryFile()
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(target.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        target.seek(0)
        for line in target.read().decode("utf-8", "replace").splitlines():
            if line.strip():
                to_log_file(f"native stderr: {line}")
        target.close()


def load_tensorflow() -> None:
    """Import TensorFlow (and probe its devices) with its native start-up noise in the log."""
    if "tensorflow" in sys.modules:
        return
    with native_stderr_to_log():
        import tensorflow as tf  # TensorFlow: heavy; this is where a command loads it

        tf.config.list_physical_devices("GPU")


class Progress:
    """Progress of ``total`` items: a tqdm bar on a terminal; elsewhere (job logs, CI) a line at
    most every ``every`` seconds and at the end, so a log shows progress without redraws."""

    def __init__(self, total: int, desc: str, unit: str = "file", every: float = 30.0, stream=None):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = stream or sys.stderr
        self.n = 0
        self.t0 = self.last = time.time()
        self.bar = None
        if _state["verbosity"] > QUIET and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm  # optional display: only on a terminal

            self.bar = tqdm(total=total, desc=desc, unit=unit, mininterval=1, file=self.stream)

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
            return
        now = time.time()
        if now - self.last >= self.every and self.n < self.total:
            self.last = now
            self._line()

    def _line(self) -> None:
        if _state["verbosity"] > QUIET:
            rate = self.n / max(time.time() - self.t0, 1e-9)
            print(f"{self.desc}: {self.n}/{self.total} {self.unit}s ({rate:.1f}/s)", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.total >= 50 or time.time() - self.t0 >= self.every:
            self._line()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
