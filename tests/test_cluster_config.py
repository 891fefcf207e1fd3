"""Offline validation of the Ray cluster-launcher configs (cluster.yaml, cluster.local.yaml).

Uses Ray's own schema validation, the same code path `ray up` runs before touching a cloud:
`prepare_config` (merge provider defaults, local-provider checks) followed by
`validate_config` (jsonschema against ray/autoscaler/ray-schema.json + consistency checks).
Both are private Ray APIs, so a plain jsonschema check against ray-schema.json is the
fallback if they move. No network, no cloud credentials, a few seconds.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

REPO = Path(__file__).resolve().parents[1]
AWS_YAML = REPO / "cluster.yaml"
LOCAL_YAML = REPO / "cluster.local.yaml"

try:  # private API (ray 2.60): the exact checks `ray up` does
    from ray.autoscaler._private.util import prepare_config, validate_config

    HAVE_RAY_VALIDATION = True
except ImportError:  # pragma: no cover - fallback if Ray moves them
    HAVE_RAY_VALIDATION = False

SCHEMA_PATH = Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json"

COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)

# A dashboard / Ray client / GCS exposed beyond localhost is remote code execution for
# anyone who can reach the port.
_PUBLIC_DASHBOARD = re.compile(r"--dashboard-host[=\s]+['\"]?(0\.0\.0\.0|::|\*)")
_CLIENT_PORT = re.compile(r"--ray-client-server-port")
_SSH_ONLY_PORTS = {22}


def _load(path: Path) -> dict:
    with open(path) as f:
        cfg = yaml.safe_load(f)
    assert isinstance(cfg, dict), f"{path.name} is not a YAML mapping"
    return cfg


def validate(cfg: dict) -> dict:
    """Validate like `ray up` does; returns the prepared (defaults-merged) config."""
    cfg = copy.deepcopy(cfg)
    if HAVE_RAY_VALIDATION:
        prepared = prepare_config(cfg)
        validate_config(prepared)
        return prepared
    with open(SCHEMA_PATH) as f:  # pragma: no cover
        jsonschema.validate(cfg, json.load(f))
    return cfg  # pragma: no cover


def security_problems(cfg: dict) -> list[str]:
    """Things that would expose the cluster beyond SSH."""
    problems = []
    for key in COMMAND_KEYS:
        for cmd in cfg.get(key) or []:
            if _PUBLIC_DASHBOARD.search(cmd):
                problems.append(f"{key}: dashboard bound to all interfaces: {cmd!r}")
            if _CLIENT_PORT.search(cmd):
                problems.append(f"{key}: Ray client server port opened: {cmd!r}")
    rules = cfg.get("provider", {}).get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        ports = set(range(rule.get("FromPort", -1), rule.get("ToPort", -1) + 1))
        if rule.get("FromPort", -1) == -1 or not ports <= _SSH_ONLY_PORTS:
            problems.append(f"security group opens more than SSH: {rule}")
    return problems


def _start_commands(cfg: dict) -> list[str]:
    cmds = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    return [c for c in cmds if "ray start" in c]


@pytest.fixture(scope="module")
def aws_raw() -> dict:
    return _load(AWS_YAML)


@pytest.fixture(scope="module")
def local_raw() -> dict:
    return _load(LOCAL_YAML)


@pytest.fixture(scope="module")
def aws(aws_raw) -> dict:
    return validate(aws_raw)


@pytest.fixture(scope="module")
def local(local_raw) -> dict:
    return validate(local_raw)


# ----------------------------------------------------------------------------- validity


def test_ray_validation_api_available():
    # If this fails, Ray moved its private helpers: the suite falls back to the bare
    # jsonschema check, which misses the local-provider and min/max_workers checks.
    assert HAVE_RAY_VALIDATION
    assert SCHEMA_PATH.is_file()


def test_aws_config_validates(aws):
    assert aws["provider"]["type"] == "aws"
    assert aws["cluster_name"] == "brsearch"


def test_aws_node_types(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head.get("max_workers", 0) == 0
    assert "GPU" not in head["resources"], "head should be a CPU node"

    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "need a GPU worker node type"
    for name, t in gpu_types.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= aws["max_workers"], name
        assert t["node_config"]["InstanceType"].startswith(("g", "p")), name
        assert t["node_config"].get("ImageId"), f"{name}: Ray's default AMI is too old"
    for name, t in types.items():
        for res, val in t["resources"].items():
            assert isinstance(val, int) and not isinstance(val, bool), (name, res, val)


def test_local_config_validates(local, local_raw):
    assert local_raw["provider"]["type"] == "local"
    assert "available_node_types" not in local_raw  # the local provider rejects it
    assert local_raw["provider"]["head_ip"]
    assert local_raw["provider"]["worker_ips"]
    # prepare_config builds the single on-prem node type itself
    assert list(local["available_node_types"]) == ["local.cluster.node"]
    node = local["available_node_types"]["local.cluster.node"]
    assert node["max_workers"] == len(local_raw["provider"]["worker_ips"])


@pytest.mark.parametrize("which", ["aws", "local"])
def test_project_installed_on_every_node(which, aws, local):
    cfg = {"aws": aws, "local": local}[which]
    mounts = cfg["file_mounts"]
    project = [remote for remote, src in mounts.items() if src in (".", "./")]
    assert project, "the repo must be shipped to the nodes via file_mounts"
    for key in ("head_setup_commands", "worker_setup_commands"):
        joined = "\n".join(cfg[key])
        assert f"-e {project[0]}" in joined, f"{key} must `pip install -e` the project"
        # nothing leaked in from Ray's provider defaults (nightly wheel, bare pip)
        assert "ray-wheels" not in joined and "\npip install" not in "\n" + joined


@pytest.mark.parametrize("which", ["aws", "local"])
def test_token_auth_on_every_node(which, aws, local):
    cfg = {"aws": aws, "local": local}[which]
    token_mounts = [r for r in cfg["file_mounts"] if r.endswith("/.ray/auth_token")]
    assert token_mounts, "the cluster auth token must be shipped to every node"
    assert cfg["file_mounts"][token_mounts[0]] == "~/.ray/auth_token"
    starts = _start_commands(cfg)
    assert len(starts) == 2
    for cmd in starts:
        assert "RAY_AUTH_MODE=token" in cmd, cmd


@pytest.mark.parametrize("which", ["aws", "local"])
def test_nothing_exposed_publicly(which, aws_raw, local_raw, aws, local):
    for cfg in {"aws": (aws_raw, aws), "local": (local_raw, local)}[which]:
        assert security_problems(cfg) == []
    prepared = {"aws": aws, "local": local}[which]
    head_start = [c for c in prepared["head_start_ray_commands"] if "ray start" in c]
    assert head_start and all("--head" in c for c in head_start)
    assert all("--dashboard-host=127.0.0.1" in c for c in head_start)


def test_aws_provider_has_no_extra_ingress(aws_raw):
    assert "security_group" not in aws_raw["provider"]


# ------------------------------------------------- our own security check can fail


@pytest.mark.parametrize(
    "cmd",
    [
        "ray start --head --port=6379 --dashboard-host=0.0.0.0",
        "ray start --head --dashboard-host 0.0.0.0",
        "ray start --head --ray-client-server-port=10001",
    ],
)
def test_security_check_catches_public_ports(aws_raw, cmd):
    bad = copy.deepcopy(aws_raw)
    bad["head_start_ray_commands"] = ["ray stop", cmd]
    assert security_problems(bad)


def test_security_check_catches_open_ingress(aws_raw):
    bad = copy.deepcopy(aws_raw)
    bad["provider"]["security_group"] = {
        "IpPermissions": [
            {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp",
             "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
        ]
    }
    assert security_problems(bad)
    validate(bad)  # schema-valid, so only our own check catches it


def test_ray_defaults_would_expose_dashboard():
    # Why head_start_ray_commands must be explicit: Ray's AWS defaults (merged in when the
    # key is missing) bind the dashboard to 0.0.0.0.
    cfg = _load(AWS_YAML)
    del cfg["head_start_ray_commands"]
    assert security_problems(validate(cfg))


# ------------------------------------------------- identical nodes, nothing on the head


def test_no_trial_runs_on_the_head(aws):
    head = aws["available_node_types"][aws["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")


def test_one_image_for_every_node_type(aws_raw):
    images = {t["node_config"]["ImageId"] for t in aws_raw["available_node_types"].values()}
    assert len(images) == 1, images
    text = AWS_YAML.read_text()
    assert len(re.findall(r"ImageId: &ami ", text)) == 1 and "ImageId: *ami" in text


def test_pin_ami_script_rewrites_the_anchor(tmp_path):
    """tools/pin_ami.sh's edit, on a copy: the anchored ImageId becomes the concrete ID and the
    file still validates with one image everywhere."""
    import subprocess

    sed = re.search(r'sed -i -E "(.*)" cluster.yaml', (REPO / "tools" / "pin_ami.sh").read_text()).group(1)
    sed = sed.replace("$AMI", "ami-0123456789abcdef0").replace("$NAME", "test").replace("$REGION", "us-west-2")
    sed = sed.replace("$(date -u +%F)", "today").replace("\\1", "\\1")
    copy = tmp_path / "cluster.yaml"
    copy.write_text(AWS_YAML.read_text())
    subprocess.run(["sed", "-i", "-E", sed, str(copy)], check=True)
    cfg = _load(copy)
    assert {t["node_config"]["ImageId"] for t in cfg["available_node_types"].values()} == {"ami-0123456789abcdef0"}
    validate(cfg)


@pytest.mark.parametrize("which", ["aws", "local"])
def test_every_node_installs_the_tested_versions(which, aws, local):
    cfg = {"aws": aws, "local": local}[which]
    joined = "\n".join(cfg["setup_commands"])
    assert "-c /home/ubuntu/brsearch/constraints.txt" in joined
    assert not re.search(r'"(ray\[[^"]*\]|optuna|mlflow|torch)==', joined), "versions come from constraints.txt"


def test_constraints_pin_every_dependency_within_pyproject():
    """constraints.txt (what nodes install, tools/freeze_constraints.py) pins every dependency
    pyproject.toml names for the project and its test extra, each pin inside pyproject's range:
    a file against the other, whatever is installed where the test runs."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    text = (REPO / "constraints.txt").read_text()
    pins = {canonicalize_name(n): v for n, v in (ln.split("==") for ln in text.splitlines() if ln and not ln.startswith("#"))}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    python = re.search(r"tested with \(python (3\.\d+)\)", text).group(1)
    for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(spec)
        if req.marker and not req.marker.evaluate({"python_version": python}):
            continue  # not installed on the Python the constraints were frozen with
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {spec!r}"
    assert "constraints.txt" in (REPO / "README.md").read_text()


# the hardware of the instance types cluster.yaml uses (AWS: g5.xlarge = 4 vCPU, 1 A10G)
INSTANCE_HARDWARE = {"g5.xlarge": {"CPU": 4, "GPU": 1}}


def test_our_cluster_choices(aws_raw):
    """What cluster.yaml decides, not what Ray's schema allows: each GPU worker advertises the
    hardware of its instance type (trials are sized from it), workers scale from zero and go
    away when idle (terminated, not stopped), the nodes' Python is the one constraints.txt was
    frozen with, and local run state is never shipped to the nodes."""
    workers = {n: t for n, t in aws_raw["available_node_types"].items() if n != aws_raw["head_node_type"]}
    assert workers
    for name, t in workers.items():
        assert t["resources"] == INSTANCE_HARDWARE[t["node_config"]["InstanceType"]], name
        assert t["min_workers"] == 0 and t["max_workers"] <= aws_raw["max_workers"], name
    assert aws_raw["idle_timeout_minutes"] <= 15 and aws_raw["provider"]["cache_stopped_nodes"] is False
    python = re.search(r"tested with \(python (3\.\d+)\)", (REPO / "constraints.txt").read_text()).group(1)
    assert f"uv venv --python {python} " in "\n".join(aws_raw["setup_commands"])
    assert {"**/.git", "**/mlruns", "**/mlflow.db"} <= set(aws_raw["rsync_exclude"])


def test_head_iam_policy_next_to_the_config():
    policy = json.loads((REPO / "cluster-iam-policy.json").read_text())
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert {"iam:PassRole", "ssm:GetParameters", "ec2:RunInstances", "ec2:TerminateInstances"} <= actions
    assert "cluster-iam-policy.json" in AWS_YAML.read_text()
