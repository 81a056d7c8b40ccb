"""What every command's parser shares: the help formatter, ``-v``/``-q``, the flags several
commands take (Ray's address, path redaction), and defaults read from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import re

from xray_dist.config import PRECISIONS
from xray_dist.data import dicomweb
from xray_dist.data.paths import REDACT, RELATIVE, PathNames
from xray_dist.data.salt import resolve as resolve_salt
from xray_dist.errors import XrayDistError

#: argparse's own entries, never configuration.
CLI_ONLY = {"command", "verbose", "quiet", "config"}


def at_least(lo: int):
    """An argparse type: an integer >= ``lo`` (checked before anything starts)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    parse.__name__ = f"integer >= {lo}"
    return parse


def shown(value) -> str:
    """A default as ``--help`` shows it: ``none``, ``off``/``on``, a list comma-separated."""
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def default(cls, name: str):
    """The default of the config dataclass ``cls``'s field ``name``: the one place it is written."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def default_help(cls, name: str) -> str:
    """`` (default: X)`` for a flag's help, X being the config's default (for flags that default to "unset",
    so that a ``--config`` file can set them)."""
    return f" (default: {shown(default(cls, name))})"


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows every flag's default (unless its text already says it)."""

    def _get_help_string(self, action):
        text = re.sub(r"%(?!\()", "%%", action.help or "")  # "95 %" is text; "%(default)s" is a field
        if action.option_strings and not action.required and "default" not in text \
                and action.default is not argparse.SUPPRESS and not isinstance(action, argparse._VersionAction):
            text += f" (default: {shown(action.default).replace('%', '%%')})"
        return text


def common() -> argparse.ArgumentParser:
    """-v/-q, accepted before the command and after it (so ``jobs/*.py`` take them too)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="also show what the log file gets: Ray, TensorFlow and per-step detail (default: off)")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="only warnings, errors and the final summary (default: off)")
    return p


def command(sub, name: str, help: str, description: str):
    """The parser of the command ``name`` (``help``: its one line in the command list)."""
    return sub.add_parser(name, help=help, description=f"{help[0].upper()}{help[1:]}.\n\n{description}",
                          parents=[common()], formatter_class=Formatter)


def add_ray_flags(p) -> None:
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else embedded local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs for embedded local Ray (default: all)")


def add_precision_flag(p) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="what the model computes in (its weights are float32): auto is bfloat16 on a CPU with AMX "
                        "or AVX-512 BF16 and float32 elsewhere (GPUs included); the agreement with float32 is in "
                        "BENCHMARKS.md")


def add_path_flags(p, where: str, salt: bool = False) -> None:
    p.add_argument("--redact-paths", action="store_true",
                   help=f"name files in {where} by a salted key instead of their relative path (xray_dist.data.paths)")
    p.add_argument("--path-map", help="with --redact-paths: CSV to write key,path to (keep it private; never inside "
                                      "the outputs)")
    p.add_argument("--uid-names", action="store_true",
                   help=f"a DICOMweb source: name its instances in {where} STUDY/SERIES/SOP.dcm by their UIDs instead "
                        "of salted keys (the default: UIDs can identify a patient's study; for outputs that stay "
                        "where the archive is)")
    if salt:
        p.add_argument("--salt-file", help="with --redact-paths: the salt (made, 0600, when missing; default: "
                                           "XRAY_DIST_SALT, else ~/.config/xray-dist/salt, as prepare's); give "
                                           "prepare's salt to get the cache's keys")


def path_names(a) -> PathNames:
    """:class:`~xray_dist.data.paths.PathNames` from predict/explain flags."""
    archive = any(dicomweb.is_source(i) for i in getattr(a, "inputs", []))  # UIDs can identify a study: keys
    if a.uid_names and not archive:
        raise XrayDistError("--uid-names names a DICOMweb source's instances by their UIDs; files are named by "
                            "their path")
    if a.uid_names and (a.redact_paths or a.path_map):
        raise XrayDistError("--uid-names and --redact-paths/--path-map name instances two ways: give one")
    keys = a.redact_paths or (archive and not a.uid_names)
    if a.path_map and not keys:
        raise XrayDistError("--path-map is written with --redact-paths only")
    if not keys:
        return PathNames(RELATIVE)
    return PathNames(REDACT, resolve_salt(a.salt_file))  # the lookup prepare uses: the same keys by default
