"""What a person sees: help on every flag with its default, --version, -v/-q anywhere, one line
per bad DICOM file (pydicom's own warnings and tracebacks in the log, not on the terminal)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from xray_dist.cli import app as cli

#: pydicom's broken files, and the kind of failure each is
CORRUPT = {
    "emri_small_jpeg_2k_lossless_too_short.dcm": "no_pixel_data",
    "JPEG2000-embedded-sequence-delimiter.dcm": "corrupt_pixel_data",
    "badVR.dcm": "unreadable",  # an IS value of '1A': a bare ValueError inside pydicom
    "JPEG-lossy.dcm": "corrupt_pixel_data",  # 12-bit baseline JPEG: no installed decoder reads it
}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_of_every_command_has_help_and_shows_its_default():
    missing, no_default = [], []
    for name, p in subcommands().items():
        assert p.description and len(p.description) > 40, name
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            flag = a.option_strings[0] if a.option_strings else a.dest
            if not (a.help or "").strip():
                missing.append(f"{name} {flag}")
            elif a.option_strings and not a.required:
                # the help as printed names a default for every optional flag (or says it is
                # required: train's --cache and --out may come from --config instead)
                f = p._get_formatter()
                f.add_argument(a)
                shown = f.format_help()
                if "default" not in shown and "(required)" not in shown:
                    no_default.append(f"{name} {flag}")
    assert not missing, f"flags without help: {missing}"
    assert not no_default, f"flags whose help shows no default: {no_default}"


def test_top_level_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Fine-tune a VGG16 chest X-ray classifier on DICOM images" in out and "prepare" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    from importlib.metadata import version

    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"xray-dist {version('xray-dist')}"


@pytest.mark.parametrize("argv", [["-v", "report", "x", "--out", "y"], ["report", "x", "--out", "y", "-v"],
                                  ["report", "-q", "x", "--out", "y"]])
def test_verbosity_before_or_after_the_command(argv):
    a = cli.build_parser().parse_args(argv)
    assert getattr(a, "verbose", False) == ("-v" in argv) and getattr(a, "quiet", False) == ("-q" in argv)


def test_jobs_take_verbosity_after_their_command(tmp_path):
    """``ray job submit ... -- python jobs/report.py RUN --out X -v``: the job's flags reach the CLI."""
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(repo / "jobs" / "report.py"), str(tmp_path / "nothing"), "--out",
                        str(tmp_path / "r.html"), "-q"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unrecognized arguments" not in r.stderr
    assert r.stderr.strip().startswith("xray-dist report: error:") and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_preview_of_a_broken_file_is_one_line_naming_it(name, tmp_path):
    """The whole stderr of the process (pydicom warns on stderr, and logs tracebacks) is one line,
    naming the file and the reason."""
    path = get_testdata_file(name)
    assert path, f"pydicom test file {name} missing"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    r = subprocess.run([sys.executable, "-m", "xray_dist.cli", "preview", path, "--out", str(tmp_path / "p.png")],
                       capture_output=True, text=True, timeout=120, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2
    assert len(lines) == 1, r.stderr
    assert name in lines[0] and "Traceback" not in r.stderr and "Warning" not in r.stderr
    assert not r.stdout.strip()


def test_the_log_gets_what_the_terminal_does_not(tmp_path, capfd):
    from xray_dist.infra import console, worker_output

    log = tmp_path / "x.log"
    console.setup(console.NORMAL, log)
    try:
        import logging
        import warnings

        logging.getLogger("pydicom").warning("pydicom says something about a tag")
        logging.getLogger("ray.data").info("ray internal detail")
        logging.getLogger("xray_dist.training.driver").info("a stage line")
        warnings.warn("a library warning", UserWarning)
        logging.getLogger("xray_dist.training.driver").debug("detail for the log")
        # pydicom quotes the value it objects to, here and in a worker: the log keeps the warning only
        logging.getLogger("pydicom").warning("Invalid value for VR PN: 'Doe^Jane'")
        worker_output._route_worker_lines({"pid": 7, "lines": ["pydicom/valuerep.py:440: UserWarning: Invalid value "
                                                               "for VR DA: '19451231 Doe'"]})
    finally:
        console.finish()
    err = capfd.readouterr().err
    assert err.strip().splitlines() == ["a stage line"]
    text = log.read_text()
    for s in ("pydicom says something", "ray internal detail", "a stage line", "a library warning",
              "detail for the log", "Invalid value for VR PN: '…'", "Invalid value for VR DA: '…'"):
        assert s in text
    assert "Doe" not in text and "19451231" not in text


def test_progress_lines_without_a_terminal(capfd):
    from xray_dist.infra import console

    console.setup(console.NORMAL, None)
    try:
        with console.Progress(120, "predict", every=0.0) as bar:
            for _ in range(120):
                bar.update()
    finally:
        console.finish()
    lines = capfd.readouterr().err.strip().splitlines()
    assert lines and all(re.match(r"predict: \d+/120 files", line) for line in lines)
    assert lines[-1].startswith("predict: 120/120") and "\r" not in "".join(lines)


@pytest.mark.slow
def test_a_workers_last_line_reaches_the_log_not_the_terminal(ray_cluster, tmp_path, capfd):
    """Ray delivers a worker's line a moment after it is printed. A command that ends right after
    its tasks (prepare's decode, a one-line predict) must still route their last lines to its log
    file, not leave them to Ray's printer on the terminal once the command has finished."""
    import ray

    from xray_dist.infra import console, runtime

    def shout(i: int, word: str) -> int:
        print(f"worker line {word} {i}", file=sys.stderr, flush=True)
        return i

    word = os.urandom(6).hex()
    log = tmp_path / "x.log"
    console.setup(console.NORMAL, log)
    try:
        runtime.init_ray()  # joins the test's Ray: the router stands in for Ray's printer
        task = ray.remote(num_cpus=0.1)(shout)
        assert ray.get([task.remote(i, word) for i in range(4)]) == list(range(4))
    finally:
        console.finish()  # at once: the lines are still on their way
    terminal = "".join(capfd.readouterr())
    assert word not in terminal
    assert sorted(line.rsplit(" ", 1)[1] for line in log.read_text().splitlines() if word in line) == list("0123")
