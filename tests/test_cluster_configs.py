"""The cluster deployment files in cluster/: fast, offline, no Ray cluster.

- `ray up` configs (cluster/*.yaml): validated the way `ray up` validates them before it
  touches a cloud (ray's `prepare_config` merges the provider's defaults.yaml, then
  `validate_config` runs ray's own ray-schema.json and its consistency checks; the network is
  blocked while they run to prove they stay offline), plus: only schema-known field names,
  EC2 node configs against botocore's RunInstances model, token auth on every `ray start`,
  the token coming from a file outside the repository, the dashboard on 127.0.0.1, and no
  ingress from the world except SSH from the operator's CIDR (the security group template and
  the GCP firewall script included).
- KubeRay manifests (cluster/kuberay/*.yaml): the fields the operator requires, token auth on
  every Ray container, no exposed Service, job specs that exist in jobs/ and validate with
  the entrypoint's --set overrides, and the CronJob's RayJob launcher run against a stub
  Kubernetes API on 127.0.0.1.
"""

from __future__ import annotations

import base64
import binascii
import copy
import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
RAY_UP_CONFIGS = sorted(CLUSTER.glob("*.yaml"))
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
SECRET = "vitflow-ray-token"
PYPROJECT = (REPO / "pyproject.toml").read_text()
CONSTRAINTS = (REPO / "constraints.txt").read_text()


def _pin(name: str) -> str:
    """The exact version the test suite runs with (constraints.txt, which `make install` uses
    and the cluster installs with too)."""
    m = re.search(rf"^{re.escape(name)}==(\S+)$", CONSTRAINTS, re.M)
    assert m, f"{name} is not pinned in constraints.txt"
    return m.group(1)


VITFLOW_VERSION = re.search(r'^version = "([^"]+)"', PYPROJECT, re.M).group(1)
WHEEL = f"vitflow-{VITFLOW_VERSION}-py3-none-any.whl"


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _ray_schema() -> dict:
    import ray.autoscaler

    with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json") as f:
        return json.load(f)


def _start_commands(cfg: dict) -> list[str]:
    return cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]


def _ray_start(cmds: list[str]) -> list[str]:
    return [c for c in cmds if "ray start" in c]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ---------------------------------------------------------------- ray up configs


def test_both_clouds_have_a_config():
    assert {p.name for p in RAY_UP_CONFIGS} == {"aws-gpu.yaml", "gcp-gpu.yaml"}


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_ray_up_config_validates_against_rays_own_schema(path, no_network):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(path)
    jsonschema.validate(raw, _ray_schema())  # the file as written
    prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` builds from it
    validate_config(prepared)
    # The provider defaults did not replace what the file sets.
    assert prepared["setup_commands"] == raw["setup_commands"]
    assert prepared["head_start_ray_commands"] == raw["head_start_ray_commands"]


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_ray_up_config_names_only_schema_known_fields(path):
    # ray-schema.json lets `provider` (and a node type's free-form node_config) carry any key;
    # a typo there would be silently ignored by `ray up`, so check the names ourselves.
    cfg, props = _load(path), _ray_schema()["properties"]
    unknown = [k for k in cfg if k not in props]
    for section in ("provider", "auth", "docker"):
        known = props[section]["properties"]
        unknown += [f"{section}.{k}" for k in cfg.get(section, {}) if k not in known]
    node_props = props["available_node_types"]["patternProperties"][".*"]["properties"]
    for name, node in cfg["available_node_types"].items():
        unknown += [f"available_node_types.{name}.{k}" for k in node if k not in node_props]
        for k in node.get("docker", {}):
            if k not in node_props["docker"]["properties"]:
                unknown.append(f"available_node_types.{name}.docker.{k}")
    assert not unknown, f"fields ray's schema does not know: {unknown}"


def test_aws_node_configs_match_the_ec2_api():
    from botocore.session import get_session
    from botocore.validate import ParamValidator

    shape = get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    cfg = _load(CLUSTER / "aws-gpu.yaml")
    for name, node in cfg["available_node_types"].items():
        params = {k: v for k, v in node["node_config"].items() if k != "SubnetIds"}  # ray's own
        report = ParamValidator().validate(dict(params, MinCount=1, MaxCount=1), shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"


def test_gcp_node_configs_use_instance_fields_and_gpu_scheduling():
    known = {
        "machineType",
        "disks",
        "networkInterfaces",
        "tags",
        "metadata",
        "scheduling",
        "serviceAccounts",
        "guestAccelerators",
        "labels",
    }
    cfg = _load(CLUSTER / "gcp-gpu.yaml")
    for name, node in cfg["available_node_types"].items():
        nc = node["node_config"]
        assert set(nc) <= known, f"{name}: {set(nc) - known}"
        if node["resources"].get("GPU"):
            assert nc["scheduling"]["onHostMaintenance"] == "TERMINATE", name


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_cpu_head_autoscaling_gpu_groups_and_a_cpu_decode_group(path):
    cfg = _load(path)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    gpu = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    cpu = {n: t for n, t in workers.items() if not t["resources"].get("GPU")}
    assert len(gpu) >= 2, "two GPU types expected"
    assert cpu and all(t["resources"]["CPU"] >= 16 for t in cpu.values())
    for name, t in workers.items():
        assert t.get("min_workers", 0) == 0, f"{name} should scale from zero"
        assert t["max_workers"] > 0, name
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]
    # A single preferred GPU type: the autoscaler breaks ties by priority.
    priorities = sorted(t.get("priority", 0) for t in gpu.values())
    assert len(set(priorities)) == len(priorities)


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_token_auth_on_every_ray_start(path):
    cfg = _load(path)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = _ray_start(cfg[key])
        assert starts, f"{key} starts no Ray"
        for cmd in starts:
            before = cmd[: cmd.index("ray start")]
            assert re.search(r"\bexport RAY_AUTH_MODE=token\b", before), cmd
            m = re.search(r"\bRAY_AUTH_TOKEN_PATH=\$HOME/([^\s;]+)", before)
            assert m, f"no RAY_AUTH_TOKEN_PATH before ray start: {cmd}"
            token_dir = "~/" + m.group(1).rsplit("/", 1)[0]
            assert token_dir in cfg["file_mounts"], f"{token_dir} is not a file mount"
            assert f"test -s ~/{m.group(1)}" in before, "start must refuse a missing token"
    # Shells on the nodes (ray exec/attach/submit) get the same variables.
    assert any("RAY_AUTH_MODE=token" in c and ".bashrc" in c for c in cfg["setup_commands"])


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_token_comes_from_a_file_outside_the_repository(path):
    cfg = _load(path)
    starts = " ".join(_ray_start(_start_commands(cfg)))
    token_file = re.search(r"RAY_AUTH_TOKEN_PATH=\$HOME/([^\s;]+)", starts).group(1)
    local = cfg["file_mounts"]["~/" + token_file.rsplit("/", 1)[0]]
    assert local.startswith("~/"), f"token source {local} must be in the operator's home"
    assert cfg["cluster_name"] in local, "one token per cluster"
    assert "RAY_AUTH_TOKEN=" not in path.read_text(), "the token value is never in the config"


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_dashboard_and_client_are_not_exposed(path):
    cfg = _load(path)
    (head_start,) = _ray_start(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    commands = _start_commands(cfg) + cfg["setup_commands"] + cfg["head_setup_commands"]
    assert not [c for c in commands if "0.0.0.0" in c]
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        world = [r for r in rule.get("IpRanges", []) if r.get("CidrIp") == "0.0.0.0/0"]
        world += [r for r in rule.get("Ipv6Ranges", []) if r.get("CidrIpv6") == "::/0"]
        if world:
            assert (rule.get("FromPort"), rule.get("ToPort")) == (22, 22), rule


def test_aws_nodes_use_the_restricted_security_group():
    cfg = _load(CLUSTER / "aws-gpu.yaml")
    groups = {
        json.dumps(t["node_config"].get("SecurityGroupIds"))
        for t in cfg["available_node_types"].values()
    }
    # Every node type names the group (so Ray never creates its SSH-from-anywhere default).
    assert len(groups) == 1 and "null" not in groups


def test_gcp_nodes_are_on_the_firewalled_subnet_and_tag():
    cfg = _load(CLUSTER / "gcp-gpu.yaml")
    script = (CLUSTER / "prereqs" / "gcp-prereqs.sh").read_text()
    tag = re.search(r"^TAG=(\S+)$", script, re.M).group(1)
    network = re.search(r"^NETWORK=(\S+)$", script, re.M).group(1)
    region = cfg["provider"]["region"]
    assert f'REGION="${{REGION:-{region}}}"' in script
    for name, t in cfg["available_node_types"].items():
        nc = t["node_config"]
        (nic,) = nc["networkInterfaces"]
        assert nic["subnetwork"] == f"regions/{region}/subnetworks/{network}", name
        assert tag in nc["tags"]["items"], name


def test_aws_prereqs_open_only_ssh_from_the_operator():
    cfn = _load(CLUSTER / "prereqs" / "aws-prereqs.cfn.yaml")
    res = cfn["Resources"]
    sg_name = next(n for n, r in res.items() if r["Type"] == "AWS::EC2::SecurityGroup")
    rules = list(res[sg_name]["Properties"].get("SecurityGroupIngress", []))
    rules += [
        r["Properties"] for r in res.values() if r["Type"] == "AWS::EC2::SecurityGroupIngress"
    ]
    assert rules
    for rule in rules:
        assert "CidrIpv6" not in rule and "SourcePrefixListId" not in rule
        if "CidrIp" in rule:
            assert rule["CidrIp"] == {"Ref": "OperatorCidr"}, rule
            assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
        else:  # intra-cluster: from the group itself
            assert rule["SourceSecurityGroupId"] == {"Fn::GetAtt": [sg_name, "GroupId"]}, rule
    pattern = re.compile(cfn["Parameters"]["OperatorCidr"]["AllowedPattern"])
    assert pattern.match("203.0.113.7/32") and pattern.match("10.0.0.0/8")
    for world in ("0.0.0.0/0", "1.2.3.4/1", "0.0.0.0/7"):
        assert not pattern.match(world), world
    # The instance profiles the ray-up config names are the ones the stack creates, and the
    # head (which launches the workers) may pass the worker role and no other.
    profile = {
        n: r["Properties"]["InstanceProfileName"]
        for n, r in res.items()
        if r["Type"] == "AWS::IAM::InstanceProfile"
    }
    aws = _load(CLUSTER / "aws-gpu.yaml")
    for name, t in aws["available_node_types"].items():
        want = "HeadInstanceProfile" if name == aws["head_node_type"] else "WorkerInstanceProfile"
        assert t["node_config"]["IamInstanceProfile"] == {"Name": profile[want]}, name
    (passrole,) = res["HeadRole"]["Properties"]["Policies"]
    (stmt,) = passrole["PolicyDocument"]["Statement"]
    assert stmt["Action"] == "iam:PassRole"
    assert stmt["Resource"] == {"Fn::GetAtt": ["WorkerRole", "Arn"]}


def test_aws_prereqs_pass_cfn_lint_when_available():
    pytest.importorskip("cfnlint")
    exe = Path(sys.executable).with_name("cfn-lint")
    if not exe.exists():
        pytest.skip("cfn-lint executable not installed")
    r = subprocess.run(
        [str(exe), str(CLUSTER / "prereqs" / "aws-prereqs.cfn.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_gcp_prereqs_open_only_ssh_from_the_operator():
    script = CLUSTER / "prereqs" / "gcp-prereqs.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    code = "\n".join(
        line for line in script.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    assert "0.0.0.0/0" not in code and "8265" not in code and "10001" not in code
    creates = re.findall(r"firewall-rules create .*?(?<!\\)\n", code, re.S)
    assert len(creates) == 2
    for rule in creates:
        if "--source-ranges" in rule:
            assert '--source-ranges "$OPERATOR_CIDR"' in rule and "--rules tcp:22 " in rule
        else:
            assert '--source-tags "$TAG" --target-tags "$TAG"' in rule
    # A world-wide CIDR is refused before any gcloud call (gcloud is not even on PATH here).
    env = {"PATH": "/usr/bin:/bin", "PROJECT": "p", "OPERATOR_CIDR": "0.0.0.0/0"}
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "no wider than /8" in r.stderr


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_setup_installs_pinned_vitflow_and_cuda_torch(path):
    cfg = _load(path)
    setup = " ".join(cfg["setup_commands"])
    torch, torchvision, ray_version = _pin("torch"), _pin("torchvision"), _pin("ray")
    assert f"torch=={torch} torchvision=={torchvision}" in setup
    assert re.search(r"--index-url https://download\.pytorch\.org/whl/cu\d+", setup)
    assert f"-c ~/vitflow-dist/constraints.txt ~/vitflow-dist/{WHEEL}" in setup
    assert f"m.version('vitflow') == '{VITFLOW_VERSION}'" in setup
    assert cfg["file_mounts"]["~/vitflow-dist"] == "./dist"  # git-ignored, built locally
    assert cfg["docker"]["image"] == f"rayproject/ray:{ray_version}-py311-gpu"
    # Both clouds install the same way.
    other = _load(CLUSTER / ("gcp-gpu.yaml" if path.name == "aws-gpu.yaml" else "aws-gpu.yaml"))
    assert other["setup_commands"] == cfg["setup_commands"]


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_commands_are_valid_bash(path):
    cfg = _load(path)
    for key in (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        for cmd in cfg.get(key, []):
            r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert r.returncode == 0, f"{key}: {cmd}\n{r.stderr}"


def test_token_guard_refuses_to_start_without_a_token(tmp_path):
    cfg = _load(CLUSTER / "aws-gpu.yaml")
    (head_start,) = _ray_start(cfg["head_start_ray_commands"])
    guard = head_start[: head_start.index("ulimit")]
    r = subprocess.run(
        ["bash", "-c", guard + " echo started"],
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "started" not in r.stdout and "no Ray token" in r.stderr


def test_dockerfile_pins_the_same_versions():
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"ARG RAY_IMAGE=rayproject/ray:{_pin('ray')}-py311-gpu" in text
    assert f"torch=={_pin('torch')} torchvision=={_pin('torchvision')}" in text
    assert f"ARG VITFLOW_WHEEL={WHEEL}" in text
    assert 'pip install --no-cache-dir -c /tmp/constraints.txt "/tmp/${VITFLOW_WHEEL}"' in text
    assert f"m.version('vitflow') == '{VITFLOW_VERSION}'" in text


def test_scale_helper_builds_autoscaler_bundles(monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no cluster/__pycache__
    spec = importlib.util.spec_from_file_location("vitflow_cluster_scale", CLUSTER / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)  # ray is imported only when it runs
    b = scale.bundles(4, 24)
    assert b[:4] == [{"GPU": 1.0, "CPU": 1.0}] * 4 and b[4:] == [{"CPU": 1.0}] * 24
    assert scale.totals(b) == {"GPU": 4.0, "CPU": 28.0}
    assert scale.bundles(1, 0, actor_cpus=0) == [{"GPU": 1.0}]
    with pytest.raises(ValueError):
        scale.bundles(-1, 0)


# ---------------------------------------------------------------- KubeRay manifests


def _docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _all_docs() -> list[tuple[str, dict]]:
    """Every manifest document, plus RayJob templates carried inside ConfigMaps."""
    out = []
    for path in MANIFESTS:
        for doc in _docs(path):
            out.append((path.name, doc))
            if doc["kind"] == "ConfigMap":
                for key, value in doc.get("data", {}).items():
                    if key.endswith(".yaml"):
                        out.append((f"{path.name}:{key}", yaml.safe_load(value)))
    return out


def _cluster_specs() -> list[tuple[str, dict]]:
    specs = []
    for where, doc in _all_docs():
        if doc.get("kind") == "RayCluster":
            specs.append((where, doc["spec"]))
        elif doc.get("kind") == "RayJob":
            specs.append((where, doc["spec"]["rayClusterSpec"]))
    return specs


def _pod_specs(cluster_spec: dict) -> list[dict]:
    pods = [cluster_spec["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]]
    return pods


def _assert_token_env(container: dict, where: str) -> None:
    env = {e["name"]: e for e in container.get("env", [])}
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", where
    token = env.get("RAY_AUTH_TOKEN")
    assert token and "value" not in token, f"{where}: RAY_AUTH_TOKEN must come from the Secret"
    assert token["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": "auth_token"}, where


def _rayjob(name: str) -> dict:
    for where, doc in _all_docs():
        if doc.get("kind") == "RayJob" and where.startswith(name):
            return doc
    raise AssertionError(f"no RayJob in {name}")


def test_manifests_are_well_formed():
    assert {p.name for p in MANIFESTS} == {
        "raycluster.yaml",
        "rayjob-embed.yaml",
        "reindex-cronjob.yaml",
        "secret-example.yaml",
    }
    for where, doc in _all_docs():
        assert doc.get("apiVersion") and doc.get("kind"), where
        meta = doc.get("metadata", {})
        assert meta.get("name") or meta.get("generateName"), where
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1", where


def test_ray_cluster_specs_have_what_the_operator_requires():
    specs = _cluster_specs()
    assert {w.split(":")[0] for w, _ in specs} == {
        "raycluster.yaml",
        "rayjob-embed.yaml",
        "reindex-cronjob.yaml",
    }
    for where, spec in specs:
        head = spec["headGroupSpec"]
        assert isinstance(head["rayStartParams"], dict), where
        assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: head must run no work"
        assert head["template"]["spec"]["containers"], where
        groups = spec["workerGroupSpecs"]
        assert {"gpu", "cpu-decode"} <= {g["groupName"] for g in groups}, where
        for g in groups:
            for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams"):
                assert key in g, f"{where}: {g.get('groupName')} lacks {key}"
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], where
            assert g["maxReplicas"] > 0 and g["template"]["spec"]["containers"], where
        gpu = next(g for g in groups if g["groupName"] == "gpu")
        limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1", f"{where}: one GPU per worker pod"
        major, minor = (int(x) for x in spec["rayVersion"].split(".")[:2])
        assert (major, minor) >= (2, 52), f"{where}: token auth needs Ray >= 2.52"
        assert spec["rayVersion"] == _pin("ray"), where


def test_long_running_cluster_autoscales_from_zero():
    (doc,) = _docs(KUBERAY / "raycluster.yaml")
    assert doc["kind"] == "RayCluster" and doc["spec"]["enableInTreeAutoscaling"] is True
    for g in doc["spec"]["workerGroupSpecs"]:
        assert g["minReplicas"] == 0 and g["replicas"] == 0, g["groupName"]


def test_token_auth_on_every_ray_container():
    for where, spec in _cluster_specs():
        assert spec["authOptions"] == {"mode": "token", "secretName": SECRET}, where
        for pod in _pod_specs(spec):
            for c in pod["containers"] + pod.get("initContainers", []):
                _assert_token_env(c, f"{where}: {c['name']}")
        if spec.get("enableInTreeAutoscaling"):
            _assert_token_env(spec["autoscalerOptions"], f"{where}: autoscaler")
    for where, doc in _all_docs():
        if doc.get("kind") == "RayJob":
            for c in doc["spec"]["submitterPodTemplate"]["spec"]["containers"]:
                _assert_token_env(c, f"{where}: submitter {c['name']}")


def test_one_vitflow_image_everywhere():
    images = set()
    for _where, doc in _all_docs():
        for c in _containers(doc):
            images.add(c["image"])
    (image,) = images
    assert image.endswith(f"/vitflow:{VITFLOW_VERSION}-cu130"), image


def _containers(doc: dict) -> list[dict]:
    found = []

    def walk(node):
        if isinstance(node, dict):
            for key in ("containers", "initContainers"):
                if isinstance(node.get(key), list):
                    found.extend(node[key])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    return found


def test_no_ray_port_is_exposed():
    for where, doc in _all_docs():
        assert doc["kind"] != "Ingress", where
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", where
    for where, spec in _cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", where
        assert not head.get("enableIngress"), where


def _check_job_entrypoint(rayjob: dict, command: str) -> Path:
    """The entrypoint's job file is mounted from a ConfigMap, exists in jobs/ and validates."""
    from vitflow.config import load_config

    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["vitflow", command]
    mounted = Path(argv[2])
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (mount,) = [
        m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == str(mounted.parent)
    ]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == f"vitflow-job-{mounted.stem}"
    job_file = REPO / "jobs" / mounted.name
    assert job_file.is_file(), f"{job_file} does not exist"
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(job_file, overrides=overrides)
    for uri in (cfg.source.uri, cfg.output.uri, cfg.model.checkpoint):
        assert uri is None or "://" in uri, f"{uri}: a cluster job needs object storage"
    # The README's ConfigMap command uses the same name and file.
    readme = (CLUSTER / "README.md").read_text()
    assert f"kubectl create configmap vitflow-job-{mounted.stem}" in readme
    assert f"--from-file={mounted.name}=jobs/{mounted.name}" in readme
    return job_file


def test_rayjob_embed_runs_a_repo_job_spec_and_shuts_down():
    (doc,) = _docs(KUBERAY / "rayjob-embed.yaml")
    assert doc["kind"] == "RayJob" and doc["apiVersion"] == "ray.io/v1"
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    assert doc["spec"]["rayClusterSpec"]
    job_file = _check_job_entrypoint(doc, "embed")
    assert job_file.name in ("flowers-dinov2.yaml", "demo.yaml")


def test_reindex_cronjob_creates_the_nightly_rayjob():
    docs = {d["kind"]: d for d in _docs(KUBERAY / "reindex-cronjob.yaml")}
    cron = docs["CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    assert cron["spec"]["schedule"] == "15 2 * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert pod["containers"][0]["command"] == ["python", "/etc/vitflow/launcher/launch_rayjob.py"]
    assert pod["volumes"][0]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    # Least privilege: RayJobs in this namespace, nothing else.
    (rule,) = docs["Role"]["rules"]
    assert rule == {
        "apiGroups": ["ray.io"],
        "resources": ["rayjobs"],
        "verbs": ["create", "get", "list", "delete"],
    }
    rayjob = yaml.safe_load(docs["ConfigMap"]["data"]["rayjob.yaml"])
    assert rayjob["metadata"]["generateName"] and rayjob["spec"]["shutdownAfterJobFinishes"]
    assert _check_job_entrypoint(rayjob, "reindex").name == "reindex-nightly.yaml"
    # The schedule matches the crontab line in jobs/schedule/.
    crontab = (REPO / "jobs" / "schedule" / "vitflow-reindex.crontab").read_text()
    assert "15 2 * * * " in crontab


def test_secret_example_is_a_placeholder():
    (doc,) = _docs(KUBERAY / "secret-example.yaml")
    assert doc["kind"] == "Secret" and doc["metadata"]["name"] == SECRET
    assert set(doc) == {"apiVersion", "kind", "metadata", "type", "data"}
    value = doc["data"]["auth_token"]
    # Not valid base64: applying the example by mistake fails instead of creating a cluster
    # whose token is written in the repository.
    with pytest.raises(binascii.Error):
        base64.b64decode(value, validate=True)


def test_no_token_is_committed():
    token_like = re.compile(r"(?<![0-9a-fA-F])[0-9a-f]{64}(?![0-9a-fA-F])")
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            assert not token_like.search(path.read_text()), f"token-like value in {path}"


def test_readme_points_at_files_that_exist():
    text = (CLUSTER / "README.md").read_text()
    for ref in set(re.findall(r"\b((?:cluster|jobs)/[\w./-]+\.(?:yaml|py|sh|crontab))", text)):
        assert (REPO / ref).exists(), f"README mentions {ref}, which does not exist"
    for ref in re.findall(r"^\| `([^`]+)` \|", text, re.M):  # the table of files
        assert (CLUSTER / ref).is_file(), f"README lists {ref}, which does not exist"
    listed = set(re.findall(r"^\| `([^`]+)` \|", text, re.M))
    for path in CLUSTER.rglob("*"):
        if path.is_file() and path.name != "README.md" and "__pycache__" not in path.parts:
            assert str(path.relative_to(CLUSTER)) in listed, f"README does not list {path}"


# ---------------------------------------------------------------- the CronJob's launcher


class _FakeKubeAPI(BaseHTTPRequestHandler):
    """Just enough of the Kubernetes API for RayJobs in one namespace."""

    store: dict
    final_status: str
    polls_before_done: int
    seen: dict

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _check(self):
        assert self.headers["Authorization"] == "Bearer sa-token"
        url = urlparse(self.path)
        prefix = "/apis/ray.io/v1/namespaces/nightly/rayjobs"
        assert url.path.startswith(prefix), url.path
        return url, url.path[len(prefix) :].strip("/")

    def do_POST(self):
        _, name = self._check()
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen["posted"].append(copy.deepcopy(body))
        name = body["metadata"]["generateName"] + "x7k2q"
        body["metadata"].update(name=name, creationTimestamp="2030-01-10T02:15:00Z")
        body["status"] = {}
        self.store[name] = body
        self._reply(201, body)

    def do_GET(self):
        url, name = self._check()
        if name:
            job = self.store[name]
            self.seen["polls"] += 1
            if self.seen["polls"] > self.polls_before_done:
                job["status"] = {"jobDeploymentStatus": "Complete", "jobStatus": self.final_status}
            else:
                job["status"] = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
            return self._reply(200, job)
        (selector,) = parse_qs(url.query)["labelSelector"]
        want = dict(kv.split("=", 1) for kv in selector.split(","))
        items = [j for j in self.store.values() if want.items() <= j["metadata"]["labels"].items()]
        self._reply(200, {"items": items})

    def do_DELETE(self):
        _, name = self._check()
        self.seen["deleted"].append(name)
        del self.store[name]
        self._reply(200, {})


def _run_launcher(tmp_path, final_status: str, old_finished: int) -> tuple[int, dict, str]:
    docs = {d["kind"]: d for d in _docs(KUBERAY / "reindex-cronjob.yaml")}
    data = docs["ConfigMap"]["data"]
    (tmp_path / "launch_rayjob.py").write_text(data["launch_rayjob.py"])
    (tmp_path / "rayjob.yaml").write_text(data["rayjob.yaml"])
    (tmp_path / "token").write_text("sa-token\n")
    labels = yaml.safe_load(data["rayjob.yaml"])["metadata"]["labels"]
    store = {
        f"vitflow-reindex-old{i:02d}": {
            "metadata": {
                "name": f"vitflow-reindex-old{i:02d}",
                "labels": dict(labels),
                "creationTimestamp": f"2030-01-0{i + 1}T02:15:00Z",  # older than the new run
            },
            "status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
        }
        for i in range(old_finished)
    }
    store["unrelated"] = {"metadata": {"name": "unrelated", "labels": {"app": "other"}}}
    seen = {"posted": [], "polls": 0, "deleted": []}
    handler = type(
        "Handler",
        (_FakeKubeAPI,),
        {"store": store, "final_status": final_status, "polls_before_done": 2, "seen": seen},
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = dict(
            os.environ,
            K8S_API=f"http://127.0.0.1:{server.server_address[1]}",
            K8S_TOKEN_FILE=str(tmp_path / "token"),
            POD_NAMESPACE="nightly",
            RAYJOB_TEMPLATE=str(tmp_path / "rayjob.yaml"),
            POLL_SECONDS="0.01",
            KEEP_RAYJOBS="7",
        )
        r = subprocess.run(
            [sys.executable, str(tmp_path / "launch_rayjob.py")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.shutdown()
        server.server_close()
    seen["template"] = yaml.safe_load(data["rayjob.yaml"])
    seen["store"] = store
    return r.returncode, seen, r.stdout + r.stderr


def test_launcher_exits_zero_when_the_ray_job_succeeds_and_prunes_old_runs(tmp_path):
    code, seen, out = _run_launcher(tmp_path, "SUCCEEDED", old_finished=9)
    assert code == 0, out
    assert seen["posted"] == [seen["template"]]
    assert seen["polls"] == 3
    assert "created rayjob/vitflow-reindex-x7k2q" in out and '"jobStatus": "SUCCEEDED"' in out
    # 10 finished runs of this schedule, 7 kept: the 3 oldest go, the new one and others stay.
    assert sorted(seen["deleted"]) == [f"vitflow-reindex-old{i:02d}" for i in range(3)]
    assert "vitflow-reindex-x7k2q" in seen["store"] and "unrelated" in seen["store"]


def test_launcher_exits_nonzero_when_the_ray_job_fails(tmp_path):
    code, seen, out = _run_launcher(tmp_path, "FAILED", old_finished=0)
    assert code == 1, out
    assert '"jobStatus": "FAILED"' in out and not seen["deleted"]
