"""Every number of every config is bounded (xray_dist.config.BOUNDS), and a config file holds flags only.

The numeric fields are found here with ``dataclasses.fields`` and the type hints, not taken from the
product's own list, so a new numeric field without a row in the table fails these tests.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import re
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest

from xray_dist.cli import app as cli
from xray_dist.cli import train as cli_train
from xray_dist.cli.common import CLI_ONLY

from xray_dist import config
from xray_dist.config import (BOUNDS, COMBO_FIELDS, ELEMENT_BOUNDS, ConfigError, PrepareConfig, PreprocessSpec,
                              SweepConfig, TrainConfig)
from xray_dist.errors import XrayDistError

REPO = Path(__file__).resolve().parents[1]
CLASSES = (PreprocessSpec, PrepareConfig, TrainConfig, SweepConfig)


def make(cls, **kw):
    """``cls`` with its required fields filled and ``kw`` on top; the baseline is valid and leaves every
    bound reachable (no validation share, so a test share just under 1 still leaves training patients;
    a 10000-epoch base, so the grace period may reach its own ceiling)."""
    if cls is PreprocessSpec:
        return PreprocessSpec(**kw)
    if cls is PrepareConfig:
        return PrepareConfig(**{"data_dir": "d", "out": "o", "val_fraction": 0.0, **kw})
    if cls is TrainConfig:
        return TrainConfig(**{"cache": "c", "out": "o", **kw})
    return SweepConfig(**{"base": TrainConfig(cache="c", out="o", epochs=10000), "out": "o", **kw})


def _numeric(hint):
    """``(container, base, optional)`` when ``hint`` is a number, an optional number or a tuple of numbers."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return ("tuple", args[0], False) if args and args[0] in (int, float) else None
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    return ("scalar", base, optional) if base in (int, float) else None


def discovered():
    out = []
    for cls in CLASSES:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = _numeric(hints[f.name])
            if kind:
                out.append((cls, f.name, *kind))
    return out


FIELDS = discovered()
SCALARS = [(c, n, b, o) for c, n, k, b, o in FIELDS if k == "scalar"]
TUPLES = [(c, n, b) for c, n, k, b, o in FIELDS if k == "tuple"]


def ids(cases):
    return [f"{c[0].__name__}.{c[1]}" for c in cases]


def bound_of(name: str) -> config.Bound:
    key = ELEMENT_BOUNDS.get(name, name) if name not in BOUNDS else name
    assert key in BOUNDS, f"{name}: a numeric config field with no row in BOUNDS (add one, and to the docstring table)"
    return BOUNDS[key]


def edges(b: config.Bound, base) -> dict:
    """The values just inside and just outside ``b`` (for floats, the neighbouring doubles)."""
    step_down = (lambda v: v - 1) if base is int else (lambda v: math.nextafter(v, -math.inf))
    step_up = (lambda v: v + 1) if base is int else (lambda v: math.nextafter(v, math.inf))
    return {"lowest": step_up(b.lo) if b.lo_open else b.lo, "highest": step_down(b.hi) if b.hi_open else b.hi,
            "too_small": b.lo if b.lo_open else step_down(b.lo), "too_large": b.hi if b.hi_open else step_up(b.hi)}


def refused(cls, name, value, shown=None) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        make(cls, **{name: value})
    err = e.value
    msg = str(err)
    assert err.key == name and "\n" not in msg, msg
    assert re.search(rf"\b{name}\b", msg) and f"{name}={repr(value) if shown is None else shown}" in msg, msg
    assert f"allowed: {bound_of(name).text()}" in msg, msg  # the range, as the table writes it
    return err


def test_every_numeric_field_was_found_and_every_bound_is_used():
    # the discovery itself: it must see the fields we know are numbers (else the table tests run on nothing)
    names = {(c.__name__, n) for c, n, *_ in FIELDS}
    assert {("TrainConfig", "epochs"), ("TrainConfig", "lr"), ("TrainConfig", "cpus_per_worker"),
            ("PrepareConfig", "seed"), ("PreprocessSpec", "image_size"), ("SweepConfig", "grace_period"),
            ("SweepConfig", "head_widths"), ("SweepConfig", "lr")} <= names
    assert len(SCALARS) >= 26 and len(TUPLES) == 4, (len(SCALARS), len(TUPLES))
    used = {ELEMENT_BOUNDS.get(n, n) if k == "tuple" else n for _, n, k, *_ in FIELDS} | set(COMBO_FIELDS)
    assert used == set(BOUNDS), set(BOUNDS) ^ used  # no field without a bound, no bound without a field


def test_docstring_table_is_what_is_enforced():
    rows = {}
    for line in config.bounds.__doc__.splitlines():
        m = re.match(r"^(\w+)\s+([\[(]-?\d+, \d+[\])])\s+(.+)$", line)
        if m:
            rows[m[1]] = (m[2], m[3].strip())
    assert set(rows) == set(BOUNDS), set(rows) ^ set(BOUNDS)
    for key, b in BOUNDS.items():
        assert rows[key] == (b.text(), b.why), key


@pytest.mark.parametrize("cls,name,base,optional", SCALARS, ids=ids(SCALARS))
def test_scalar_field_bounds(cls, name, base, optional):
    b = bound_of(name)
    e = edges(b, base)
    for where in ("lowest", "highest"):  # the boundary values themselves are allowed, stored as plain numbers
        v = getattr(make(cls, **{name: e[where]}), name)
        assert v == e[where] and type(v) is base, (where, v)
    refused(cls, name, e["too_small"])
    refused(cls, name, e["too_large"])
    big = 99999999999999999999999 if base is int else 1e300
    refused(cls, name, big)
    refused(cls, name, -big)
    err = refused(cls, name, True)  # bool is not a number, even where 1 is allowed
    assert "true/false" in str(err)
    refused(cls, name, False)
    refused(cls, name, str(e["lowest"]))  # a string is not a number (the CLI converts before this)
    if base is float:
        for v in (math.nan, math.inf, -math.inf):
            assert "finite" in str(refused(cls, name, v))
        v = getattr(make(cls, **{name: np.float32(e["highest"]) if e["highest"] == 1 else e["highest"]}), name)
        assert type(v) is float
    else:
        refused(cls, name, e["lowest"] + 0.5)  # no silent truncation
        refused(cls, name, float(e["lowest"]))  # a float is not an int (a YAML 3.0 is converted by the CLI)
        refused(cls, name, math.nan)
        v = getattr(make(cls, **{name: np.int64(e["highest"])}), name)
        assert v == e["highest"] and type(v) is int  # numpy integers become ints (JSON-writable)
    if optional:
        assert getattr(make(cls, **{name: None}), name) is None


@pytest.mark.parametrize("cls,name,base", TUPLES, ids=ids(TUPLES))
def test_sweep_values_are_held_to_the_trained_fields_bounds(cls, name, base):
    """Each value of a tune range must itself be a valid value of the training field it sets."""
    b = bound_of(name)
    e = edges(b, base)
    ok = make(cls, **{name: [e["lowest"], e["highest"]]})  # a list is fine, stored as a tuple
    assert getattr(ok, name) == (e["lowest"], e["highest"])
    good = e["highest"]
    for bad in (e["too_small"], e["too_large"], True, "1"):
        refused(cls, name, (good, bad), shown=repr((good, bad)))
    if base is float:
        for bad in (math.nan, math.inf):
            refused(cls, name, (good, bad), shown=repr((good, bad)))
    else:
        refused(cls, name, (good, 2.5), shown=repr((good, 2.5)))
    with pytest.raises(ConfigError, match=name):
        make(cls, **{name: ()})
    # the trials a sweep makes pass TrainConfig's own bounds too
    assert name in ELEMENT_BOUNDS and ELEMENT_BOUNDS[name] in {f.name for f in dataclasses.fields(TrainConfig)}


def test_combos_are_held_to_the_trained_fields_bounds():
    lo = tuple(edges(BOUNDS[n], int)["lowest"] for n in COMBO_FIELDS)
    hi = tuple(edges(BOUNDS[n], int)["highest"] for n in COMBO_FIELDS)
    assert make(SweepConfig, combos=[list(lo), hi]).combos == (lo, hi)
    bad_count = 0
    for i, n in enumerate(COMBO_FIELDS):
        e = edges(BOUNDS[n], int)
        for bad in (e["too_small"], e["too_large"], True, 1.5):
            c = list(hi)
            c[i] = bad
            with pytest.raises(ConfigError) as err:
                make(SweepConfig, combos=(tuple(c),))
            assert err.value.key == "combos" and ":".join(map(str, c)) in str(err.value)
            assert f"{n} {'WKD'[i]} in {BOUNDS[n].text()}" in str(err.value)
            bad_count += 1
    assert bad_count == 12
    with pytest.raises(ConfigError, match="W:K:D triples"):
        make(SweepConfig, combos=((0, 2),))


def test_grace_period_is_bounded_by_the_runs_epochs():
    base = TrainConfig(cache="c", out="o", epochs=3)
    assert SweepConfig(base=base, out="o", grace_period=3).grace_period == 3
    with pytest.raises(ConfigError, match=re.escape("grace_period must be in [1, epochs=3]")):
        SweepConfig(base=base, out="o", grace_period=4)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_boolean_fields_take_booleans_only(cls):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if hints[f.name] is bool]
    for name in names:
        with pytest.raises(ConfigError, match=rf"{name} must be true or false. Received: {name}=1"):
            make(cls, **{name: 1})
        assert getattr(make(cls, **{name: False}), name) is False


def test_metric_must_be_one_that_is_reported_and_higher_is_better():
    assert make(TrainConfig, metric="val_auc").metric == "val_auc"
    with pytest.raises(ConfigError, match=r"metric must be one of val_auc_abnormal, .* Received: metric='banana'"):
        make(TrainConfig, metric="banana")


def test_config_error_is_typed_one_line_and_survives_pickling():
    with pytest.raises(ConfigError) as e:
        make(TrainConfig, epochs=10**9)
    err = e.value
    assert isinstance(err, XrayDistError) and isinstance(err, ValueError)  # ValueError: older callers keep working
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ConfigError and back.key == "epochs" and str(back) == str(err)
    assert str(err) == ("epochs must be <= 10000 (allowed: [1, 10000]; a checkpoint every epoch; fine-tuning needs "
                        "tens). Received: epochs=1000000000")


# ---- the CLI: config files and flags ---------------------------------------------------------------------------


def one_error_line(capsys, argv, conf: Path | None = None, text: str | None = None) -> str:
    if text is not None:
        conf.write_text(text)
        argv = [*argv, "--config", str(conf)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("cmd,key,near", [
    ("train", "metric", None),  # a config field, but no flag: not settable from a file
    ("train", "keep_checkpoints", None),
    ("train", "features", None),
    ("train", "head_widht", "head_width"),
    ("tune", "epoch", "epochs"),
    ("tune", "head_width", "head_widths"),  # tune searches widths: the single width is not a tune flag
])
def test_config_keys_must_be_flags(tmp_path, capsys, cmd, key, near):
    line = one_error_line(capsys, [cmd], tmp_path / "c.yaml", f"cache: /c\nout: {tmp_path / 'o'}\n{key}: banana\n")
    assert f"unknown keys ['{key}']" in line and f"not flags of `xray-dist {cmd}`" in line, line
    assert (f"did you mean {near}?" in line) if near else "no flag is close" in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("cmd", ["train", "tune"])
def test_every_flag_is_a_valid_config_key(tmp_path, cmd):
    """The other way round: every flag the parser has may be written in the file (none refused as unknown)."""
    sub = __import__("argparse").ArgumentParser().add_subparsers()
    cli.COMMANDS[cmd][0](sub)
    dests = {a.dest for a in sub.choices[cmd]._actions} - CLI_ONLY - {"help"}
    assert {"epochs", "lr", "seed", "num_workers"} <= dests and len(dests) >= 20
    config.check_keys(dests, dests, "x", cmd)  # does not raise
    with pytest.raises(ConfigError):
        config.check_keys(dests | {"metric"}, dests, "x", cmd)


@pytest.mark.parametrize("text,needle", [
    ("lr: .inf\n", "lr must be a finite number (allowed: (0, 1]"),
    ("lr: .nan\n", "lr must be a finite number"),
    ("lr: 'inf'\n", "Received: lr=inf"),
    ("seed: 99999999999999999999999\n", "seed must be <= 4294967295"),
    ("epochs: 1000000000\n", "epochs must be <= 10000"),
    ("num_workers: 100000\n", "num_workers must be <= 1024"),
    ("epochs: true\n", "epochs: expected int, got True"),
    ("lr: 0\n", "lr must be > 0"),
    ("dropout: 1\n", "dropout must be < 1"),
    ("worker-cache-mb: 2000000\n", "worker_cache_mb must be <= 1048576"),
])
def test_train_yaml_values_out_of_bounds(tmp_path, capsys, text, needle):
    line = one_error_line(capsys, ["train"], tmp_path / "c.yaml", f"cache: /c\nout: {tmp_path / 'o'}\n{text}")
    assert needle in line, line


@pytest.mark.parametrize("text,needle", [
    ("head_widths: [0, 100000]\n", "head_widths must be <= 65536 (allowed: [0, 65536]"),
    ("lr: [1.0e-4, .inf]\n", "Received: lr=(0.0001, inf)"),
    ("lr: 1e-4,2\n", "lr must be <= 1"),
    ("unfreeze_blocks: [0, 6]\n", "unfreeze_blocks must be <= 5"),
    ("num_classes: [2, 1001]\n", "num_classes must be <= 1000"),
    ("num_classes: [true]\n", "num_classes: expected a comma-separated list of int"),
    ("head_widths: [2.5]\n", "head_widths: expected a comma-separated list of int"),
    ("combos: '0:2:9'\n", "combos are W:K:D triples"),
    ("num_samples: 100000\n", "num_samples must be <= 10000"),
    ("grace_period: 6\n", "grace_period must be in [1, epochs=5]"),
])
def test_tune_yaml_ranges_out_of_bounds(tmp_path, capsys, text, needle):
    line = one_error_line(capsys, ["tune"], tmp_path / "c.yaml", f"cache: /c\nout: {tmp_path / 's'}\n{text}")
    assert needle in line, line


@pytest.mark.parametrize("argv,needle", [
    (["train", "--lr", "inf"], "lr must be a finite number"),
    (["train", "--lr", "nan"], "lr must be a finite number"),
    (["train", "--epochs", "1000000000"], "epochs must be <= 10000"),
    (["train", "--seed", "99999999999999999999999"], "seed must be <= 4294967295"),
    (["train", "--batch-size", "0"], "batch_size must be >= 1"),
    (["train", "--gpus-per-worker", "17"], "gpus_per_worker must be <= 16"),
    (["tune", "--lr", "1e-4,nan"], "lr must be a finite number"),
    (["tune", "--head-widths", "0,70000"], "head_widths must be <= 65536"),
    (["tune", "--max-concurrent", "100000"], "max_concurrent must be <= 10000"),
    (["prepare", "/d", "--val-fraction", "nan"], "val_fraction must be a finite number"),
    (["prepare", "/d", "--image-size", "5000"], "image_size must be <= 4096"),
])
def test_flags_out_of_bounds(tmp_path, capsys, argv, needle):
    line = one_error_line(capsys, [*argv, *([] if argv[0] == "prepare" else ["--cache", "/c"]),
                                   "--out", str(tmp_path / "o")])
    assert needle in line, line


def test_values_inside_the_bounds_still_load(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("cache: /c\nout: /o\nlr: 1\nepochs: 10000\nseed: 4294967295\nnum-workers: 1024\n"
                    "cpus_per_worker: 0.5\ndropout: 0\n")
    cfg = cli_train.train_config_from_args(cli.build_parser().parse_args(["train", "--config", str(conf)]))
    assert (cfg.lr, cfg.epochs, cfg.seed, cfg.num_workers, cfg.cpus_per_worker) == (1.0, 10000, 2**32 - 1, 1024, 0.5)
    conf.write_text("cache: /c\nout: /o\nhead_widths: [0, 65536]\nunfreeze_blocks: 0,5\nlr: [1.0e-6, 1]\n"
                    "combos: ['65536:1000:5', '0:1:0']\nepochs: 3\ngrace_period: 3\n")
    s = cli_train.sweep_config_from_args(cli.build_parser().parse_args(["tune", "--config", str(conf)]))
    assert (s.head_widths, s.unfreeze_blocks, s.lr, s.combos, s.grace_period) == \
        ((0, 65536), (0, 5), (1e-6, 1.0), ((65536, 1000, 5), (0, 1, 0)), 3)


@pytest.mark.parametrize("cmd,text,needle", [
    ("train", "metric: banana\n", "unknown keys ['metric']"),
    ("tune", "head_widths: [0, 100000]\n", "head_widths must be <= 65536"),
])
def test_cli_subprocess_exits_2_with_one_line(tmp_path, cmd, text, needle):
    """The real command, as a user runs it: exit 2 and one line on stderr naming the key."""
    conf = tmp_path / "c.yaml"
    conf.write_text(f"cache: /c\nout: {tmp_path / 'o'}\n{text}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "xray_dist.cli", cmd, "--config", str(conf)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, (p.returncode, p.stderr)
    assert lines[0].startswith(f"xray-dist {cmd}: error: ") and needle in lines[0], lines
    assert p.stdout == ""


def test_a_renamed_key_is_named_as_renamed_in_a_config_file_and_on_resume(tmp_path):
    """`mixed_precision` became `precision`: a --config file naming it is told the new name and
    how the values map; a sweep recorded with it is refused on resume, saying why."""
    import json

    from xray_dist.training.resume import changed_settings, check_same_settings

    with pytest.raises(ConfigError, match=r"mixed_precision: renamed precision \(auto stays auto"):
        config.check_keys({"mixed_precision", "epochs"}, {"precision", "epochs"}, "x.yaml", "tune")
    (tmp_path / "rec.json").write_text(json.dumps({"mixed_precision": "auto", "epochs": 2}))
    new = {"precision": "auto", "epochs": 2}
    with pytest.raises(XrayDistError, match="started before --mixed-precision became --precision") as e:
        check_same_settings(str(tmp_path), "rec.json", "sweep", lambda old: changed_settings(old, new))
    assert len(str(e.value).splitlines()) == 1
    (tmp_path / "rec.json").write_text(json.dumps({"precision": "float32", "epochs": 2}))
    with pytest.raises(XrayDistError) as e:
        check_same_settings(str(tmp_path), "rec.json", "sweep", lambda old: changed_settings(old, new))
    assert "became" not in str(e.value)
