"""deploy/: the manifests parse and agree with the server (ports, probes, grace period, settings)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tokenwire.server.settings import Settings, environment_variables

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "kubernetes"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object of the kustomization, keyed by (kind, name)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objects = {}
    for resource in kustomization["resources"]:
        for doc in documents(K8S / resource):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def settings_from_env(env: dict[str, str]) -> Settings:
    """Settings as the server would read them from these variables alone."""
    return Settings.from_sources(argparse.Namespace(), env)


def test_every_yaml_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 7
    for path in files:
        assert documents(path), path


def test_configmap_holds_valid_settings(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    data = k8s[("ConfigMap", "tokenwire")]["data"]
    assert set(data) <= set(environment_variables())
    settings = settings_from_env(data)
    assert (settings.port, settings.metrics_port, settings.log_format) == (50051, 9464, "json")


def test_deployment_probes_ports_grace_and_secret(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployment = k8s[("Deployment", "tokenwire")]
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    [container] = spec["containers"]
    settings = settings_from_env(k8s[("ConfigMap", "tokenwire")]["data"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.port, "metrics": settings.metrics_port}
    probes = {kind: container[kind]["grpc"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for probe in probes.values():
        assert isinstance(probe["port"], int) and probe["port"] == settings.port  # native gRPC probes need a number
    assert probes["startupProbe"]["service"] == ""
    assert probes["readinessProbe"]["service"] == "tokenwire.v1.GenerationService"
    assert probes["livenessProbe"]["service"] == "liveness"
    # The kubelet's SIGKILL must come after the drain's grace period, with room to exit.
    assert settings.grace_period + 5 <= spec["terminationGracePeriodSeconds"] <= settings.grace_period + 30
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(settings.metrics_port)
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    env = {e["name"]: e.get("value") for e in container["env"]}
    token_dir = env["TOKENWIRE_AUTH_TOKEN_FILE"].rsplit("/", 1)[0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    [auth_volume] = [name for name, path in mounts.items() if path == token_dir]
    # The Secret is generated from a token file the operator writes: its name is the one mounted
    # (no hash suffix) and its key the file name the server reads.
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    [generated] = [g for g in kustomization["secretGenerator"] if g["name"] == volumes[auth_volume]["secret"]["secretName"]]
    assert generated["options"]["disableNameSuffixHash"] is True
    keys = [entry.split("=", 1)[0] for entry in generated["files"]]
    assert keys == [env["TOKENWIRE_AUTH_TOKEN_FILE"].rsplit("/", 1)[1]]


def test_no_token_ships_with_the_manifests() -> None:
    """A token in the repository would be one every reader knows: the generator's file is the
    operator's, kept out of git, and no manifest carries a Secret of its own."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = [entry.split("=", 1)[1] for g in kustomization["secretGenerator"] for entry in g["files"]]
    ignored = (DEPLOY.parent / ".gitignore").read_text().split()
    assert all(f"/deploy/kubernetes/{name}" in ignored for name in files)
    assert all(doc["kind"] != "Secret" for path in K8S.glob("*.yaml") for doc in documents(path) if "kind" in doc)


def test_services_select_the_pods(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    pod_labels = k8s[("Deployment", "tokenwire")]["spec"]["template"]["metadata"]["labels"]
    headless = k8s[("Service", "tokenwire-headless")]["spec"]
    regular = k8s[("Service", "tokenwire")]["spec"]
    assert headless["clusterIP"] == "None" and regular.get("clusterIP") != "None"
    for service in (headless, regular):
        assert service["selector"].items() <= pod_labels.items()
        assert {"port": 50051, "targetPort": "grpc"}.items() <= service["ports"][0].items()


def test_compose_and_dockerfile_agree_with_the_server() -> None:
    [compose] = documents(DEPLOY / "docker-compose.yaml")
    service = compose["services"]["tokenwire"]
    grace = settings_from_env(service["environment"]).grace_period
    assert int(service["stop_grace_period"].rstrip("s")) > grace
    assert "50051:50051" in service["ports"] and "9464:9464" in service["ports"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^EXPOSE 50051 9464$", dockerfile, re.MULTILINE)
    assert re.search(r"^STOPSIGNAL SIGTERM$", dockerfile, re.MULTILINE)
    assert re.search(r"^USER 10001$", dockerfile, re.MULTILINE)
    env = dict(re.findall(r"(TOKENWIRE_\w+)=(\S+)", dockerfile))
    assert settings_from_env(env).port == 50051
