"""deploy/: the Ray cluster launcher YAML, the KubeRay manifest and the Dockerfile parse and name
the right entry points (``pdserve up``), image and ports."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from pdserve.cli import build_parser
from pdserve.cluster_config import ClusterConfig, check_security, from_dict, load
from pdserve.security import TLSMode

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
IMAGE = "pdserve:0.1.0"
ROUTER_PORT = 50051


def _pdserve_up_args(cmd: str) -> list[str]:
    """The argv of the ``pdserve up ...`` in a shell command line (env assignments dropped)."""
    words = [w for w in shlex.split(cmd) if not re.fullmatch(r"[A-Z_]+=.*", w)]
    assert words[:2] == ["pdserve", "up"], cmd
    return words[1:]


def _assert_tls_on(c: ClusterConfig) -> None:
    """``c`` serves TLS with mutual TLS and a cluster token, from files under one folder."""
    check_security(c)  # raises when it would serve off loopback without TLS and a token
    s = c.security
    assert s.tls_on(c.host) and s.tls in (TLSMode.AUTO, TLSMode.ON)
    assert s.mtls and s.ca and s.cert and s.key and s.cluster_token_file
    assert len({str(Path(p).parent) for p in (s.ca, s.cert, s.key, s.cluster_token_file)}) == 1


def test_pdserve_config_is_valid():
    c = load(DEPLOY / "ray" / "pdserve.yaml")
    assert c.router.port == ROUTER_PORT and c.router.node_resource == "pdserve-router"
    assert c.prefill.count >= 1 and c.decode.count >= 1
    assert c.host == "node"
    _assert_tls_on(c)


def test_ray_cluster_launcher_yaml_starts_ray_with_token_auth_then_pdserve_up():
    y = yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in y, key
    assert y["docker"]["image"] == IMAGE
    head = y["head_start_ray_commands"]
    start = next(c for c in head if "ray start --head" in c)
    assert "RAY_AUTH_MODE=token" in start and "pdserve-router" in start  # pins the router to the head
    up = next(c for c in head if "pdserve up" in c)
    assert head.index(up) > head.index(start)
    a = build_parser().parse_args(_pdserve_up_args(up))
    assert a.command == "up" and a.config == "/etc/pdserve/cluster.yaml" and a.address == "auto"
    assert y["file_mounts"][a.config] == "deploy/ray/pdserve.yaml"
    assert any("auth_token" in k for k in y["file_mounts"])  # the token reaches every host
    # pdserve's certificates and token reach every host where the pdserve config expects them
    tls_dir = str(Path(load(DEPLOY / "ray" / "pdserve.yaml").security.ca).parent)
    assert tls_dir in y["file_mounts"]
    assert all("RAY_AUTH_MODE=token" in c for c in y["worker_start_ray_commands"] if "ray start" in c)


def test_kuberay_manifest_runs_ray_nodes_and_a_pdserve_up_job():
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kuberay" / "raycluster.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ConfigMap", "RayCluster", "Service", "Job"}
    rc = kinds["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1" and rc["spec"]["rayVersion"] == "2.60.0"
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == IMAGE
    ports = {p["containerPort"] for p in head["ports"]}
    assert {6379, 8265, 10001, ROUTER_PORT} <= ports
    assert "pdserve-router" in rc["spec"]["headGroupSpec"]["rayStartParams"]["resources"]
    workers = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["image"] == IMAGE
    for c in (head, workers):
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "pdserve-ray-token"
    job = kinds["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert job["image"] == IMAGE
    a = build_parser().parse_args(job["command"][1:])
    assert job["command"][0] == "pdserve" and a.command == "up"
    assert a.address == f"{rc['metadata']['name']}-head-svc:6379"  # KubeRay's head service
    assert {e["name"] for e in job["env"]} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
    svc = kinds["Service"]["spec"]
    assert svc["ports"][0]["port"] == ROUTER_PORT
    assert svc["selector"].items() <= rc["spec"]["headGroupSpec"]["template"]["metadata"]["labels"].items()
    # the ConfigMap holds a valid pdserve config whose router listens on the Service's port
    c = from_dict(yaml.safe_load(kinds["ConfigMap"]["data"]["cluster.yaml"]))
    assert c.router.port == ROUTER_PORT and c.router.node_resource == "pdserve-router"
    # TLS is on, from the pdserve-tls secret mounted on every Ray pod where the config reads it
    _assert_tls_on(c)
    tls_dir = str(Path(c.security.ca).parent)
    pod_specs = [rc["spec"]["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in rc["spec"]["workerGroupSpecs"]
    ]
    for spec in pod_specs:
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            mount = next(m for m in container["volumeMounts"] if m["mountPath"] == tls_dir)
            assert volumes[mount["name"]]["secret"]["secretName"] == "pdserve-tls"


def test_dockerfile_installs_pdserve_and_exposes_ports():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0].startswith("FROM python:3.11")
    assert any(ln.startswith("RUN pip install") and ln.rstrip().endswith(" .") for ln in lines)
    exposed = {int(p) for ln in lines if ln.startswith("EXPOSE") for p in ln.split()[1:]}
    assert {6379, 8265, 10001, ROUTER_PORT} <= exposed
    entry = next(ln for ln in lines if ln.startswith("ENTRYPOINT"))
    cmd = next(ln for ln in lines if ln.startswith("CMD"))
    argv = yaml.safe_load(entry.split(None, 1)[1]) + yaml.safe_load(cmd.split(None, 1)[1])
    assert argv[:2] == ["pdserve", "up"]
    a = build_parser().parse_args(argv[1:])
    assert a.config == "/etc/pdserve/cluster.yaml"
    assert "COPY deploy/ray/pdserve.yaml /etc/pdserve/cluster.yaml" in lines
    for pkg in ("pdserve", "engine", "prefill_worker", "decode_worker", "kv_store", "router"):
        assert any(ln.startswith(f"COPY {pkg} ") for ln in lines), pkg
