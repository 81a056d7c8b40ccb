"""cluster.yaml and the job package, run through Ray 2.60's own launcher and packaging code.

- The network: ``ray up``'s own config step (``commands._bootstrap_config``: Ray's validation, then
  ``bootstrap_aws``) runs on cluster.yaml against moto's in-process EC2, where the security group
  was made as cluster.yaml's header tells the user to make it; Ray's AWS node provider then launches
  a head and a worker from the resolved config. No rule anywhere lets the internet in, and every
  instance answers metadata requests with a session token only (IMDSv2). The same harness, given
  the old ``provider.security_group`` style, shows Ray adding SSH from 0.0.0.0/0 itself.
- The job package: the documented ``ray job submit`` lines (cluster.yaml's and
  jobs/runtime_env.yaml's), parsed by Ray's own CLI, packed by Ray's own packaging functions from a
  copy of the repository's code with DICOM files, a prepared cache, salts, a path map, runs and a
  venv lying around: the zip holds exactly the code.
"""

from __future__ import annotations

import copy
import ipaddress
import shlex
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
REGION = "us-east-1"
SSH_CIDR = "203.0.113.0/24"  # cluster.yaml's documented SSH_CIDR
SG_PLACEHOLDER = "sg-SECURITY_GROUP_ID"


def _cluster_text() -> str:
    return (REPO / "cluster.yaml").read_text()


# --------------------------------------------------------------------------------------- network


@pytest.fixture
def ec2_account(tmp_path, monkeypatch):
    """moto's in-process AWS, isolated from the session's S3 server and from any real account:
    fake credentials, no endpoint override, HOME in tmp (Ray writes its SSH key to ~/.ssh), and
    Ray's cached boto3 clients dropped before and after."""
    from moto import mock_aws
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.aws import node_provider as aws_node_provider
    from ray.autoscaler._private.aws import utils as aws_utils

    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2", "AWS_ENDPOINT_URL_IAM", "AWS_PROFILE",
                "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(aws_node_provider, "list_ec2_instances", _cluster_instance_types)
    caches = (aws_utils.resource_cache, aws_utils.client_cache, aws_config._get_subnets_or_die)
    for c in caches:
        c.cache_clear()
    with mock_aws():
        import boto3

        iam = boto3.client("iam", region_name=REGION)
        for profile in ("xray-dist-head", "xray-dist-worker"):  # made by the user, as the header says
            iam.create_instance_profile(InstanceProfileName=profile)
        yield boto3.client("ec2", region_name=REGION)
    for c in caches:
        c.cache_clear()


def _cluster_instance_types(region: str, aws_credentials=None) -> list[dict]:
    """Stands in for Ray's ``list_ec2_instances`` (resource autodetection, not networking): that pages
    through every EC2 instance type, seconds of moto time; the types cluster.yaml uses, from the same
    moto API, are all that ``fillout_available_node_types_resources`` reads."""
    import boto3

    types = sorted({n["node_config"]["InstanceType"]
                    for n in yaml.safe_load(_cluster_text())["available_node_types"].values()})
    return boto3.client("ec2", region_name=region).describe_instance_types(InstanceTypes=types)["InstanceTypes"]


def make_documented_security_group(ec2) -> str:
    """The header's aws CLI steps, as boto3 calls: a group in the default VPC, SSH from SSH_CIDR,
    everything from members of the group itself."""
    header = _cluster_text().split("cluster_name:")[0]
    assert "Name=is-default,Values=true" in header and f"--port 22 --cidr {SSH_CIDR}" in header
    assert '--protocol all --source-group "$SG"' in header
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    sg = ec2.create_security_group(VpcId=vpc, GroupName="xray-dist",
                                   Description="xray-dist: SSH from SSH_CIDR, Ray between members")["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": SSH_CIDR}]}])
    ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": sg}]}])
    return sg


def ray_up_config(raw: dict) -> dict:
    """What `ray up` resolves before it starts anything (the config cache off)."""
    from ray.autoscaler._private.commands import _bootstrap_config

    return _bootstrap_config(copy.deepcopy(raw), no_config_cache=True)


def launch_head_and_worker(config: dict) -> None:
    """Ray's AWS node provider starts one node of each type, with the node configs exactly as
    `ray up` (head: its ``head_node`` part merged in) and the autoscaler (workers) build them."""
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    provider = AWSNodeProvider(config["provider"], config["cluster_name"])
    head = copy.deepcopy(config.get("head_node", {}))
    head.update(config["available_node_types"][config["head_node_type"]]["node_config"])
    provider.create_node(head, {"ray-node-type": "head", "ray-user-node-type": "head"}, 1)
    worker = copy.deepcopy(config["available_node_types"]["gpu_worker"]["node_config"])
    provider.create_node(worker, {"ray-node-type": "worker", "ray-user-node-type": "gpu_worker"}, 1)


def ingress_rules(ec2) -> dict[str, list[tuple]]:
    """Every ingress rule of every security group in the account: group id -> (protocol, from port,
    to port, source), the source being a CIDR or a group id."""
    rules = {}
    for g in ec2.describe_security_groups()["SecurityGroups"]:
        rules[g["GroupId"]] = [
            (p["IpProtocol"], p.get("FromPort"), p.get("ToPort"), source)
            for p in g["IpPermissions"]
            for source in ([r["CidrIp"] for r in p.get("IpRanges", [])]
                           + [r["CidrIpv6"] for r in p.get("Ipv6Ranges", [])]
                           + [r["GroupId"] for r in p.get("UserIdGroupPairs", [])]
                           + [r["PrefixListId"] for r in p.get("PrefixListIds", [])])
        ]
    return rules


def open_to_internet(ec2) -> list[tuple]:
    """The rules whose source is the whole internet (0.0.0.0/0, ::/0), on any port."""
    return [(gid, *rule) for gid, rules in ingress_rules(ec2).items() for rule in rules
            if not rule[3].startswith(("sg-", "pl-")) and ipaddress.ip_network(rule[3]).prefixlen == 0]


def test_ray_up_opens_nothing_to_the_internet_and_nodes_speak_imdsv2_only(ec2_account):
    ec2 = ec2_account
    sg = make_documented_security_group(ec2)
    groups_before = set(ingress_rules(ec2))
    raw = yaml.safe_load(_cluster_text().replace(SG_PLACEHOLDER, sg))

    config = ray_up_config(raw)
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 4  # autodetected: the full path ran

    # Ray made no group of its own and added no rule: every rule is one the user wrote
    rules = ingress_rules(ec2)
    assert set(rules) == groups_before
    assert sorted(rules[sg]) == sorted([("tcp", 22, 22, SSH_CIDR), ("-1", None, None, sg)])
    assert open_to_internet(ec2) == []
    vpc = ec2.describe_security_groups(GroupIds=[sg])["SecurityGroups"][0]["VpcId"]
    for name, node in config["available_node_types"].items():
        node_config = node["node_config"]
        assert node_config["SecurityGroupIds"] == [sg], name
        assert node_config["MetadataOptions"]["HttpTokens"] == "required", name
        subnets = ec2.describe_subnets(SubnetIds=node_config["SubnetIds"])["Subnets"]
        assert subnets and {s["VpcId"] for s in subnets} == {vpc}, name  # Ray picked the group's VPC

    launch_head_and_worker(config)

    instances = [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]
    assert len(instances) == 2
    for inst in instances:
        assert inst["MetadataOptions"]["HttpTokens"] == "required", inst["InstanceType"]
        assert [g["GroupId"] for g in inst["SecurityGroups"]] == [sg], inst["InstanceType"]
    assert open_to_internet(ec2) == []


def test_the_old_provider_security_group_style_opens_ssh_to_the_internet(ec2_account):
    """The break-check of the harness above: a group that Ray creates from ``provider.security_group``
    (the style cluster.yaml used before) gets Ray's own SSH rule for 0.0.0.0/0 beside the user's CIDR."""
    raw = yaml.safe_load(_cluster_text())
    for node in raw["available_node_types"].values():
        del node["node_config"]["SecurityGroupIds"]
    raw["provider"]["security_group"] = {"GroupName": "xray-dist-ssh-only", "IpPermissions": [
        {"FromPort": 22, "ToPort": 22, "IpProtocol": "TCP", "IpRanges": [{"CidrIp": SSH_CIDR}]}]}

    ray_up_config(raw)

    opened = open_to_internet(ec2_account)
    assert [rule[1:] for rule in opened] == [("tcp", 22, 22, "0.0.0.0/0")]


def test_every_node_type_uses_the_users_group_and_imdsv2_only():
    raw = yaml.safe_load(_cluster_text())
    assert "security_group" not in raw["provider"]  # a group Ray creates gets SSH from 0.0.0.0/0
    groups = [node["node_config"]["SecurityGroupIds"] for node in raw["available_node_types"].values()]
    assert groups and all(g == [SG_PLACEHOLDER] for g in groups)
    for name, node in raw["available_node_types"].items():
        assert node["node_config"]["MetadataOptions"]["HttpTokens"] == "required", name


def test_ray_up_syncs_only_the_code():
    """file_mounts name the code one by one (never the whole folder, where data may lie), and inside
    those folders rsync leaves out data by file pattern only (a folder name would drop a subpackage)."""
    raw = yaml.safe_load(_cluster_text())
    local = {(REPO / p).resolve() for p in raw["file_mounts"].values()}
    assert local == {REPO / "xray_dist", REPO / "jobs", REPO / "pyproject.toml", REPO / "README.md"}
    assert all(p.exists() for p in local)
    excluded = set(raw["rsync_exclude"])
    assert {"*.dcm", "*.parquet", "*.npz", "*.csv", ".salt", "*.salt", "__pycache__"} <= excluded
    subpackage_like = {"data", "cache", "caches", "runs", "sweeps", "model", "training"}
    assert not excluded & subpackage_like


# ----------------------------------------------------------------------------------- job package


def documented_submit_args(path: Path) -> list[str]:
    """The `ray job submit` line that a file's comments document (continuation lines joined)."""
    lines = [ln.lstrip("#").strip() for ln in path.read_text().splitlines() if ln.startswith("#")]
    joined, buf = [], ""
    for ln in lines:
        buf += ln[:-1] + " " if ln.endswith("\\") else ln
        if not ln.endswith("\\"):
            joined.append(buf)
            buf = ""
    commands = [c for c in joined if c.startswith("ray job submit")]
    assert len(commands) == 1, commands
    return shlex.split(commands[0])[3:]


def make_working_tree(root: Path) -> set[str]:
    """A copy of the repository's code, with what users leave around it; returns the code files
    (relative paths) that a job needs."""
    shutil.copytree(REPO / "xray_dist", root / "xray_dist")  # with its __pycache__, if any
    shutil.copytree(REPO / "jobs", root / "jobs")
    for name in ("pyproject.toml", ".rayignore", ".gitignore"):
        shutil.copy2(REPO / name, root / name)
    code = {p.relative_to(root).as_posix() for d in ("xray_dist", "jobs") for p in (root / d).rglob("*.py")
            if "__pycache__" not in p.parts} | {"pyproject.toml"}
    junk = [
        "scan001.dcm", "IMG.DCM", "study.dicom", "dicoms/IM0001", "dicoms/images/a.dcm", "images/b.dcm",
        "data/labels.csv", "Data_Entry_2017.csv",
        "cache/manifest.parquet", "cache/images/chunk-x.parquet", "cache/preprocess.json", "cache/.salt",
        ".salt", "mysalt.salt", "salt", "path_map.csv", "paths/path_map_2026.csv", "features.npz",
        "runs/r1/model.keras", "runs/r1/train.log", "sweeps/s1/trials.parquet",
        ".venv/bin/python", "venv/lib/x.py", ".mlflow-server/mlflow.db", "mlruns/0/meta.yaml",
        "xray-dist-demo/cache/manifest.parquet", "demo_out/preds.csv", "xray_dist.egg-info/PKG-INFO",
        "README.md", "notes.txt", ".git/config", "scratch.py",
        # inside the code folders too
        "xray_dist/stray.dcm", "xray_dist/images/IM0002", "xray_dist/images/c.dcm",
        "xray_dist/cache_debug.parquet", "xray_dist/__pycache__/x.cpython-311.pyc",
        "jobs/.salt", "jobs/mysalt.salt", "jobs/path_map.csv", "jobs/out.npz", "jobs/IM0003.dcm",
    ]
    for rel in junk:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"not code " + rel.encode())
    return code


def pack_as_ray_job_submit(submit_args: list[str], tree: Path, out: Path, include_gitignore: bool) -> set[str]:
    """What `ray job submit ARGS` uploads from ``tree`` (the current directory): Ray's CLI parses the
    arguments, builds the runtime env (--runtime-env file, --working-dir), adds its default excludes,
    and packs with the functions its JobSubmissionClient uses; returns the zip's member names."""
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.dashboard.modules.job.cli import submit

    params = submit.make_context("submit", list(submit_args)).params
    runtime_env = parse_runtime_env_args(runtime_env=params["runtime_env"],
                                         runtime_env_json=params["runtime_env_json"],
                                         working_dir=params["working_dir"])
    packed = []

    def upload(working_dir, excludes, is_file=False):  # JobSubmissionClient._upload_package's packing
        assert not is_file and Path(working_dir).resolve() == tree.resolve()
        create_package(working_dir, out, include_gitignore=include_gitignore, include_parent_dir=False,
                       excludes=excludes)
        packed.append(out)

    upload_working_dir_if_needed(runtime_env, include_gitignore=include_gitignore, upload_fn=upload)
    assert packed == [out]
    with zipfile.ZipFile(out) as z:
        return {n for n in z.namelist() if not n.endswith("/")}


@pytest.mark.parametrize("documented_in", ["cluster.yaml", "jobs/runtime_env.yaml"])
def test_job_submit_packs_the_code_only(documented_in, tmp_path, monkeypatch):
    args = documented_submit_args(REPO / documented_in)
    assert args[args.index("--working-dir") + 1] == "."
    tree = tmp_path / "xray-dist"
    tree.mkdir()
    code = make_working_tree(tree)
    assert any(p.startswith("xray_dist/") for p in code) and any(p.startswith("jobs/") for p in code)
    monkeypatch.chdir(tree)  # the documented commands run from the repository's root
    # with .gitignore (Ray's default) and without it (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1):
    # .rayignore alone keeps the package to the code
    for include_gitignore in (True, False):
        members = pack_as_ray_job_submit(args, tree, tmp_path / f"pkg-{include_gitignore}.zip",
                                         include_gitignore)
        assert members == code, (include_gitignore, sorted(members ^ code))
