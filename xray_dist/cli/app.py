"""The ``xray-dist`` command: the parser of every subcommand, and :func:`main`, which sets up the
terminal and the log, runs one command and turns its failure into one line and an exit status.

Each stage's commands (their flags, the config they build, the summary they print) live in their
own module: :mod:`~xray_dist.cli.prepare`, :mod:`~xray_dist.cli.train`,
:mod:`~xray_dist.cli.inference`, :mod:`~xray_dist.cli.results`, :mod:`~xray_dist.cli.demo`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import PackageNotFoundError, version

from xray_dist.cli import demo, inference, prepare, results, train
from xray_dist.cli.common import Formatter, common
from xray_dist.errors import XrayDistError
from xray_dist.infra import console, redaction

log = logging.getLogger("xray_dist")

#: Each command: (adds its parser, runs it).
COMMANDS = {
    "prepare": (prepare.add_prepare, prepare.cmd_prepare),
    "synth": (prepare.add_synth, prepare.cmd_synth),
    "preview": (prepare.add_preview, prepare.cmd_preview),
    "train": (train.add_train, train.cmd_train),
    "predict": (inference.add_predict, inference.cmd_predict),
    "tune": (train.add_tune, train.cmd_tune),
    "explain": (inference.add_explain, inference.cmd_explain),
    "evaluate": (results.add_evaluate, results.cmd_evaluate),
    "calibrate": (results.add_calibrate, results.cmd_calibrate),
    "report": (results.add_report, results.cmd_report),
    "export": (inference.add_export, inference.cmd_export),
    "demo": (demo.add_demo, demo.cmd_demo),
}
#: Commands whose config is built (and checked) before anything else: a bad one stops in a second.
_CONFIGS = {"train": train.train_config_from_args, "tune": train.sweep_config_from_args}


DESCRIPTION = """\
Fine-tune a VGG16 chest X-ray classifier on DICOM images — on this machine or on a Ray cluster.

  prepare   decode the DICOM files once into a cache, split patients, list every file not used
  train     fine-tune on the cache (Ray Train; resumable)      tune      search head x classes x depth
  evaluate  the numbers to report, on held-out patients        report    one HTML page of results
  calibrate honest probabilities: a temperature fitted on validation
  predict   probabilities for new files     explain   Grad-CAM heatmaps     export    a serving model
  demo      all of it on synthetic data, in about two minutes

Run `xray-dist COMMAND --help` for a command's flags."""


def _version() -> str:
    try:
        return version("xray-dist")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xray-dist", description=DESCRIPTION, formatter_class=Formatter,
                                     parents=[common()])
    parser.add_argument("--version", action="version", version=f"xray-dist {_version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


#: Commands whose log file lives in the directory they write (a run, a sweep, the demo).
_LOG_IN_OUT = {"train", "tune", "demo"}
#: Commands that load TensorFlow in this process.
_USES_TENSORFLOW = {"train", "tune", "demo", "predict", "explain", "export", "evaluate"}  # not calibrate


#: Flags naming input locations, which can carry a patient's name (``/data/SMITH_JOHN/labels.csv``):
#: with --redact-paths, every form of them is replaced by its placeholder in what is printed and logged.
_INPUT_LOCATIONS = {"data_dir": "<data>", "labels": "<labels>", "metadata": "<metadata>",
                    "mimic_patients": "<patients>", "split_file": "<split-file>", "inputs": "<input>"}


def _protect_inputs(a) -> None:
    """--redact-paths: the command's input locations go to :func:`xray_dist.infra.redaction.protect`."""
    if not getattr(a, "redact_paths", False):
        return
    for attr, placeholder in _INPUT_LOCATIONS.items():
        value = getattr(a, attr, None)
        for location in value if isinstance(value, list) else [value] if value else []:
            redaction.protect(location, placeholder)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    level = console.VERBOSE if getattr(a, "verbose", False) else console.QUIET if getattr(a, "quiet", False) \
        else console.NORMAL
    _protect_inputs(a)
    console.setup(level, console.log_path_for(a.command, getattr(a, "out", None), a.command in _LOG_IN_OUT))
    try:
        if a.command in _CONFIGS:  # a bad config stops in a second, before TensorFlow loads
            a.cfg = _CONFIGS[a.command](a)
        if a.command in _USES_TENSORFLOW:
            console.load_tensorflow()  # its native start-up lines go to the log, not the terminal
        return COMMANDS[a.command][1](a)
    except (XrayDistError, ValueError) as e:
        log.debug("%s failed", a.command, exc_info=True)
        print(f"xray-dist {a.command}: error: {redaction.scrub(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xray-dist {a.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug or an unforeseen failure: one line here, the traceback in the log
        if level >= console.VERBOSE and not redaction.protected():
            raise  # Python prints the traceback; with --redact-paths it is logged (cleaned) below instead
        log.log(logging.ERROR if level >= console.VERBOSE else logging.DEBUG, "%s failed", a.command, exc_info=True)
        where = console.log_file()
        print(f"xray-dist {a.command}: unexpected error: {type(e).__name__}: {redaction.scrub(str(e))}"
              + (f" (traceback in {where})" if where else ""), file=sys.stderr)
        return 1
    finally:
        console.finish()


if __name__ == "__main__":
    sys.exit(main())
