"""The thin layers: CLI flag/config handling, preview, the cluster launcher config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from xray_dist.cli import app as cli
from xray_dist.cli import train as cli_train
from xray_dist.config import PreprocessSpec
from xray_dist.data.dicom import load_image
from xray_dist.data.synth import synthesize

REPO = Path(__file__).resolve().parents[1]


def test_preview_writes_exactly_the_model_input(tmp_path):
    syn = synthesize(tmp_path / "d", patients=2, images_per_patient=2, size=80, seed=3)
    src = next(f for f in syn.files if "mono1" in f.name)  # MONOCHROME1: must come out inverted
    assert cli.main(["preview", str(src), "--out", str(tmp_path / "p.png"), "--size", "48"]) == 0
    png = np.asarray(Image.open(tmp_path / "p.png"))
    assert png.shape == (48, 48) and png.dtype == np.uint8
    np.testing.assert_array_equal(png, load_image(src, PreprocessSpec(image_size=48)))
    assert png[24, 24] > png[2, 2]  # body (dense) brighter than the air outside it


def test_synth_gives_every_class_every_encoding(tmp_path):
    """`xray-dist synth` with its defaults, checked from outside (labels.csv and the DICOM headers,
    not synth's own records): each class has files in all 8 encodings, so no class can be told
    apart by how its files are encoded."""
    import csv

    import pydicom

    from xray_dist.data.synth import ENCODINGS

    assert cli.main(["synth", str(tmp_path / "d"), "--size", "64"]) == 0
    with open(tmp_path / "d" / "labels.csv") as f:
        labels = {r["path"]: r["label"] for r in csv.DictReader(f)}
    seen: dict[str, set] = {}
    for rel, label in labels.items():
        ds = pydicom.dcmread(tmp_path / "d" / rel, stop_before_pixels=True)
        encoding = (str(ds.file_meta.TransferSyntaxUID), ds.PhotometricInterpretation, int(ds.BitsAllocated),
                    int(ds.PixelRepresentation), "WindowCenter" in ds)
        seen.setdefault(label, set()).add(encoding)
    all_encodings = set().union(*seen.values())
    assert len(all_encodings) == len(ENCODINGS) == 8
    assert len(seen) == 2 and all(s == all_encodings for s in seen.values()), seen


def test_preview_bad_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "x.dcm"
    bad.write_text("no")
    assert cli.main(["preview", str(bad), "--out", str(tmp_path / "p.png")]) == 2
    assert "x.dcm" in capsys.readouterr().err


def test_train_flags_override_yaml_config(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump({"cache": "/c", "out": "/o", "epochs": 7, "head-width": 64, "lr": 0.01}))
    a = cli.build_parser().parse_args(["train", "--config", str(conf), "--epochs", "3"])
    cfg = cli_train.train_config_from_args(a)
    assert (cfg.epochs, cfg.head_width, cfg.lr, cfg.cache) == (3, 64, 0.01, "/c")
    assert cfg.batch_size == 16  # the TrainConfig default, defined once


def test_train_config_errors_name_the_field(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump({"cache": "/c", "out": "/o", "unfreeze_blocks": 9}))
    with pytest.raises(ValueError, match="unfreeze_blocks=9"):
        cli_train.train_config_from_args(cli.build_parser().parse_args(["train", "--config", str(conf)]))
    conf.write_text(yaml.safe_dump({"cache": "/c", "out": "/o", "wieghts": "none"}))
    with pytest.raises(ValueError, match="wieghts"):
        cli_train.train_config_from_args(cli.build_parser().parse_args(["train", "--config", str(conf)]))


class TestStrictConfiguration:
    """Config files and flags are read strictly, before anything starts: exit 2, one line, the key named."""

    @staticmethod
    def run(tmp_path, capsys, argv, values=None) -> list[str]:
        if values is not None:
            conf = tmp_path / "c.yaml"
            conf.write_text(values)
            argv = [*argv, "--config", str(conf)]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], err
        return err[0]

    def test_yaml_numbers_written_the_short_way_are_numbers(self, tmp_path):
        conf = tmp_path / "c.yaml"
        conf.write_text("cache: /c\nout: /o\nlr: 1e-4\nepochs: '3'\ndropout: 0\n")  # YAML reads 1e-4 as a string
        cfg = cli_train.train_config_from_args(cli.build_parser().parse_args(["train", "--config", str(conf)]))
        assert (cfg.lr, cfg.epochs, cfg.dropout) == (1e-4, 3, 0.0)
        assert isinstance(cfg.lr, float) and isinstance(cfg.epochs, int)
        s = cli_train.sweep_config_from_args(cli.build_parser().parse_args(
            ["tune", "--config", str(conf), "--grace-period", "2"]))
        assert s.base.lr == 1e-4 and s.lr == (1e-4, 1e-4) and s.grace_period == 2

    def test_tune_config_rejects_unknown_keys(self, tmp_path, capsys):
        line = self.run(tmp_path, capsys, ["tune"], "cache: /c\nout: /o\nepoch: 20\n")
        assert "unknown keys ['epoch']" in line

    @pytest.mark.parametrize("cmd", ["train", "tune"])
    def test_wrong_types_name_key_value_and_type(self, tmp_path, capsys, cmd):
        line = self.run(tmp_path, capsys, [cmd], "cache: /c\nout: /o\nepochs: ten\n")
        assert "epochs: expected int, got 'ten'" in line
        line = self.run(tmp_path, capsys, [cmd], "cache: /c\nout: /o\nweights: [a, b]\n")
        assert "weights: expected str, got ['a', 'b']" in line

    @pytest.mark.parametrize("argv,needle", [
        (["train", "--cache", "/c", "--out", "/o", "--seed", "-1"], "seed must be >= 0"),
        (["train", "--cache", "/c", "--out", "/o", "--max-failures", "-2"], "max_failures"),
        (["train", "--cache", "/c", "--out", "/o", "--cpus-per-worker", "0"], "cpus_per_worker must be > 0"),
        (["train", "--cache", "/c", "--out", "/o", "--num-workers", "0"], "num_workers must be >= 1"),
        (["tune", "--cache", "/c", "--out", "/o", "--grace-period", "0"], "grace_period must be in [1, epochs=5]"),
        (["tune", "--cache", "/c", "--out", "/o", "--epochs", "3", "--grace-period", "4"], "grace_period"),
        (["tune", "--cache", "/c", "--out", "/o", "--combos", "0:0:0"], "W:K:D triples"),
        (["tune", "--cache", "/c", "--out", "/o", "--combos", "0:2"], "W:K:D triples"),
        (["tune", "--cache", "/c", "--out", "/o", "--combos", "0:two:0"], "combos: expected W:K:D triples"),
        (["tune", "--cache", "/c", "--out", "/o", "--max-concurrent", "0"], "max_concurrent must be >= 1"),
        (["tune", "--cache", "/c", "--out", "/o", "--head-widths", "0,wide"], "head_widths: expected"),
        (["prepare", "/d", "--out", "/o", "--seed", "-3"], "seed must be >= 0"),
        (["prepare", "/d", "--out", "/o", "--num-cpus", "0"], "num_cpus must be >= 1"),
    ])
    def test_out_of_range_values(self, tmp_path, capsys, argv, needle):
        assert needle in self.run(tmp_path, capsys, argv)

    def test_bootstrap_count_is_checked_by_the_parser(self, capsys):
        with pytest.raises(SystemExit) as e:
            cli.main(["report", "/r", "--out", "/r.html", "--bootstrap", "0"])
        assert e.value.code == 2 and "must be >= 1, got 0" in capsys.readouterr().err


def test_tune_flags_take_lists():
    a = cli.build_parser().parse_args(["tune", "--cache", "/c", "--out", "/s", "--head-widths", "0,64",
                                       "--num-classes", "2,4", "--unfreeze-blocks", "0,2", "--lr", "1e-4,1e-2",
                                       "--workers-per-trial", "2"])
    s = cli_train.sweep_config_from_args(a)
    assert (s.head_widths, s.num_classes, s.unfreeze_blocks, s.lr) == ((0, 64), (2, 4), (0, 2), (1e-4, 1e-2))
    assert s.base.num_workers == 2 and s.out == "/s"
    from xray_dist.training.tune import in_process, trial_resources

    assert s.trial_runner == "auto" and not in_process(s)  # two workers per trial: Ray Train runs
    assert trial_resources(s) == {"cpu": 0.1}
    one = cli_train.sweep_config_from_args(cli.build_parser().parse_args(
        ["tune", "--cache", "/c", "--out", "/s", "--gpus-per-worker", "1"]))
    assert in_process(one) and trial_resources(one) == {"cpu": 1.0, "gpu": 1}  # the trial process trains
    forced = cli_train.sweep_config_from_args(cli.build_parser().parse_args(
        ["tune", "--cache", "/c", "--out", "/s", "--trial-runner", "train"]))
    assert not in_process(forced)
    bad = cli_train.sweep_config_from_args(cli.build_parser().parse_args(
        ["tune", "--cache", "/c", "--out", "/s", "--trial-runner", "inprocess", "--workers-per-trial", "2"]))
    with pytest.raises(ValueError, match="one worker per trial"):
        in_process(bad)
    with pytest.raises(ValueError, match="combos"):  # explicit trials only make sense as a grid
        cli_train.sweep_config_from_args(cli.build_parser().parse_args(
            ["tune", "--cache", "/c", "--out", "/s", "--combos", "0:2:0", "--search", "optuna"]))


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)
    assert set(config["available_node_types"]) == {"head", "gpu_worker"}
    assert config["available_node_types"]["gpu_worker"]["max_workers"] >= 1
    setup = " ".join(raw["setup_commands"])
    assert "pip install" in setup and "xray-dist" in setup
    assert "--dashboard-host=127.0.0.1" in " ".join(raw["head_start_ray_commands"])  # never public
    # the network (no rule open to the internet, IMDSv2) and what is synced: tests/test_cluster.py
    for name, node in raw["available_node_types"].items():
        volumes = node["node_config"]["BlockDeviceMappings"]
        assert volumes and all(v["Ebs"]["Encrypted"] is True for v in volumes), name
        assert node["node_config"]["IamInstanceProfile"]["Name"], name  # bucket access without keys
    # token authentication: the token is created on the head, the head and workers start in token mode
    assert "get-auth-token --generate" in " ".join(raw["head_setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in raw[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    assert "~/.ray/auth_token" in raw["cluster_synced_files"]


def test_runtime_env_pins_the_project_dependencies():
    """jobs/runtime_env.yaml installs exactly pyproject's pins (Ray itself is the cluster's)."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert sorted(env["pip"]) == sorted(d for d in deps if not d.startswith("ray["))
    assert env["env_vars"]["TF_USE_LEGACY_KERAS"] == "1"
    assert not any("SECRET" in k or "KEY" in k for k in env.get("env_vars", {}))


def test_an_unreachable_mlflow_server_stops_train_with_one_line(tmp_path, monkeypatch):
    """Tracking was asked for: a server that cannot be reached is an error before training starts,
    naming the URI (not a traceback, not a run that trains untracked)."""
    from xray_dist.config import TrainConfig
    from xray_dist.errors import XrayDistError
    from xray_dist.results.tracking import start_train_run

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = TrainConfig(cache=str(tmp_path / "c"), out=str(tmp_path / "run"), mlflow="http://127.0.0.1:9")
    with pytest.raises(XrayDistError, match=r"--mlflow http://127\.0\.0\.1:9: cannot start a run there") as e:
        start_train_run(cfg, "fp", {})
    assert "\n" not in str(e.value)
    assert start_train_run(TrainConfig(cache="c", out=str(tmp_path / "r2")), "fp", {}) is None  # no URI: no tracking


@pytest.mark.parametrize("job", ["prepare", "train", "tune", "evaluate", "report"])
def test_each_job_script_is_its_command(job):
    """jobs/<command>.py, what `ray job submit` runs, is `xray-dist <command>` from the submitted
    working directory (tests/test_train.py::test_ray_job_submit submits the two that use Ray to a real head)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "jobs" / f"{job}.py"), "--help"], capture_output=True, text=True,
                          timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: xray-dist {job} "), proc.stdout[:200]
