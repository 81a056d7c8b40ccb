"""What Ray's worker processes print, on its way to the terminal or the log file.

In a worker, :func:`worker_logging` prints xray-dist's lines, marked with :data:`MARK` when they
are for the terminal (each epoch's line from rank 0, for instance), and :func:`mask_pydicom_warnings`
(Ray's ``worker_process_setup_hook``) masks the values pydicom's warnings quote. In the driver,
:func:`route_worker_output` replaces Ray's printer of the output it forwards by a router: every
line to the log file, the marked ones to the terminal too (:mod:`xray_dist.infra.console`).
Ray delivers a worker's lines a moment after they are printed (its log monitor tails the workers'
files); at the end of the command :func:`_drain` waits for what was printed before it, so a late
line still reaches the log file and not, through Ray's printer, the terminal.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import uuid
import warnings

import absl.logging

from xray_dist.infra import compat, console

log = logging.getLogger(__name__)

#: Prefix of a worker's line that belongs on the terminal (see :func:`worker_logging`).
MARK = "[xray-dist] "
#: The router's name among the handlers of Ray's dispatcher of worker output.
_ROUTER = "xray_dist_logs"
#: Ray's own printer, while the router stands in for it (put back when the command finishes).
_ray_printer: list[tuple] = []
#: The token :func:`_drain` waits for, and the event the router sets when it arrives.
_drain_token: dict[str, threading.Event] = {}
#: The longest a command's end waits for its workers' last lines (a Ray that is gone answers sooner).
DRAIN_TIMEOUT_S = 10.0


def route_worker_output() -> None:
    """After ``ray.init``: the worker output Ray forwards to this driver is routed by
    :func:`_route_worker_lines` (file, and the marked lines to the terminal)."""
    console.adopt_ray_loggers()
    if console.verbosity() >= console.VERBOSE:
        return  # everything on the terminal, as Ray prints it
    printer = compat.replace_worker_printer(_ROUTER, _route_worker_lines)
    if printer:
        _ray_printer[:] = [printer]
        console.at_finish(_restore_ray_printer)  # once restored, a second call finds nothing to do


def _restore_ray_printer() -> None:
    """The end of the command: the workers' last lines delivered, then Ray's printer back in place
    of the router."""
    if _ray_printer:
        _drain()
        compat.restore_worker_printer(_ROUTER, _ray_printer.pop())


def _print_token(token: str) -> None:
    print(token, file=sys.stderr, flush=True)


def _drain(timeout: float = DRAIN_TIMEOUT_S) -> bool:
    """Wait until Ray has delivered the worker output printed before now: a task prints a token,
    and Ray's log monitor reads every worker's file in each pass, so the pass that delivers the
    token has delivered what the workers printed before it. False (and nothing raised) when the
    token does not come within ``timeout`` s: Ray stopped, or a busy cluster started no task."""
    import ray  # Ray: loaded already where the router stands

    if not ray.is_initialized():
        return False
    token = f"xray-dist-drain-{uuid.uuid4().hex}"
    arrived = _drain_token.setdefault(token, threading.Event())
    try:
        ray.get(ray.remote(num_cpus=0, max_retries=0)(_print_token).remote(token), timeout=timeout)
        return arrived.wait(timeout)
    except Exception as e:  # noqa: BLE001 - the command's own outcome matters more than its workers' last lines
        log.debug("worker output not drained: %s", e)
        return False
    finally:
        _drain_token.pop(token, None)


def _route_worker_lines(data: dict) -> None:
    """Ray's worker output: every line to the log file; the marked ones to the terminal too."""
    who = data.get("actor_name") or data.get("task_name") or "worker"
    for line in data.get("lines", []):
        if line.strip() in _drain_token:
            _drain_token[line.strip()].set()
            continue
        if MARK in line:
            message = line.split(MARK, 1)[1]
            if console.verbosity() > console.QUIET or message.startswith(("WARNING", "ERROR")):
                print(message, file=sys.stderr, flush=True)
        console.to_log_file(f"({who} pid={data.get('pid')}) {line}")


def worker_logging(terminal: bool = True) -> None:
    """In a Ray worker (a Train worker, a Tune trial): xray-dist's INFO lines are printed — with
    :data:`MARK` when they are for the terminal (the driver's router shows those; a sweep trial's
    lines go to the log only, Tune's progress lines speak for it); TensorFlow's Python logger and
    absl are turned down to errors (their per-step collective lines go nowhere). Nothing changes
    in a driver (a test calling the training loop itself): its logging is :func:`console.setup`'s."""
    if not compat.in_ray_worker():
        return
    lg = logging.getLogger("xray_dist")
    for h in [h for h in lg.handlers if getattr(h, "_xray_dist_worker", False)]:
        lg.removeHandler(h)  # a reused process (Tune's) may switch between trial and run
    h = console.StderrHandler()
    h.setFormatter(_WorkerFormatter(terminal))
    h._xray_dist_worker = True
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    lg.propagate = False
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") >= "2":
        for name in ("tensorflow", "absl"):
            logging.getLogger(name).setLevel(logging.ERROR)
        absl.logging.set_verbosity(absl.logging.ERROR)


def mask_pydicom_warnings() -> None:
    """In a process that reads DICOM files outside :func:`console.setup` (a Ray worker, whose
    stderr Ray also keeps in its session's log files): pydicom's warnings are masked before they
    are printed. Idempotent; meant as Ray's ``worker_process_setup_hook``."""
    shown = warnings.showwarning
    if getattr(shown, "_xray_dist", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if "pydicom" in str(filename) or "for VR " in text:
            message = console.clean(text, from_pydicom=True)
        shown(message, category, filename, lineno, file, line)

    show._xray_dist = True
    warnings.showwarning = show


class _WorkerFormatter(logging.Formatter):
    """A worker's line: marked for the terminal when ``terminal`` (or a warning or error)."""

    def __init__(self, terminal: bool):
        super().__init__()
        self.terminal = terminal

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{MARK}{record.levelname}: {text}"
        return f"{MARK}{text}" if self.terminal else f"{record.levelname} {record.name}: {text}"
