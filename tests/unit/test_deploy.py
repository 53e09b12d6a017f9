"""The deployment files: the Dockerfile, deploy/compose.yaml and the kustomize base in deploy/k8s.

No container runtime or cluster runs where this is tested, so these tests check what can be
checked without one: the kustomize base renders (`kubectl kustomize`, offline) with the fields a
production Deployment needs, the config every replica reads is valid for ccproxy with the values
the manifests give it, and the Dockerfile and Compose file agree with both. The topology itself
runs as processes in tests/integration/test_fleet.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ccproxy.config import parse_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CONFIG_PATH = "/etc/ccproxy/ccproxy.yaml"


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed (it renders kustomize offline; no cluster needed)", pytrace=False)
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    by_kind: dict[str, dict[str, Any]] = {}
    for d in docs:
        name = d["metadata"]["name"]
        key = d["kind"] if d["kind"] != "ConfigMap" else f"ConfigMap/{name.rsplit('-', 1)[0]}"
        assert key not in by_kind, f"two {key} objects"
        by_kind[key] = d
    return by_kind


def _container(rendered: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = rendered["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def test_every_object_is_there(rendered: dict[str, dict[str, Any]]) -> None:
    assert set(rendered) == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "Secret",
                             "ConfigMap/ccproxy-config", "ConfigMap/ccproxy-env"}


def test_probes_resources_and_security(rendered: dict[str, dict[str, Any]]) -> None:
    c = _container(rendered)
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), kind
    pod = rendered["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/tmp" in mounts  # writable places with a read-only root: /tmp and the usage journal
    assert "/var/lib/ccproxy/spool" in mounts


def test_service_pdb_and_hpa_select_the_deployment(rendered: dict[str, dict[str, Any]]) -> None:
    dep = rendered["Deployment"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    svc = rendered["Service"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in _container(rendered)["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    assert rendered["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = rendered["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    assert hpa["minReplicas"] >= 2


def test_the_config_each_replica_reads_is_valid(rendered: dict[str, dict[str, Any]],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    c = _container(rendered)
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["CCPROXY_CONFIG"] == CONFIG_PATH
    config_map = rendered["ConfigMap/ccproxy-config"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(Path(CONFIG_PATH).parent))
    volumes = rendered["Deployment"]["spec"]["template"]["spec"]["volumes"]
    volume = next(v for v in volumes if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]  # the hashed generator name
    refs = {next(iter(r.values()))["name"] for r in c["envFrom"]}
    assert refs == {rendered["Secret"]["metadata"]["name"], rendered["ConfigMap/ccproxy-env"]["metadata"]["name"]}
    for name, value in {**rendered["Secret"]["stringData"], **rendered["ConfigMap/ccproxy-env"]["data"]}.items():
        monkeypatch.setenv(name, value)
    config = parse_config(yaml.safe_load(config_map["data"]["ccproxy.yaml"]), "configmap")
    assert config.host == "0.0.0.0" and config.port == 8081
    assert config.database_url and config.redis_url  # shared state: every replica sees the same keys and limits
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert config.usage.spool_dir in mounts  # the usage journal on a volume, not the read-only root
    grace = rendered["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > config.drain_seconds


def test_dockerfile() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage"
    user = re.search(r"^USER (\S+)", text, re.M)
    assert user and user.group(1).split(":")[0] not in ("0", "root")
    assert re.search(r"^HEALTHCHECK .*?/health", text, re.M | re.S)
    assert re.search(r'^ENTRYPOINT \["ccproxy"\]', text, re.M)
    assert f"CCPROXY_CONFIG={CONFIG_PATH}" in text
    assert re.search(r"^ARG EXTRAS", text, re.M) and "--extra" in text, "the optional parts behind a build argument"
    assert "uv sync --frozen" in text  # the lock file decides the versions


def test_compose_runs_three_replicas_behind_a_load_balancer(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    replicas = [n for n in services if n.startswith("ccproxy-")]
    assert len(replicas) == 3
    assert {"lb", "redis", "postgres"} <= set(services)
    nginx = (DEPLOY / "nginx.conf").read_text()
    for r in replicas:
        assert f"server {r}:8081" in nginx
        svc = services[r]
        assert svc["read_only"] is True
        assert any(v.endswith(":/var/lib/ccproxy/spool") for v in svc["volumes"])  # its usage journal
        volume = next(v for v in svc["volumes"] if v.endswith(f":{CONFIG_PATH}:ro"))
        config_file = DEPLOY / volume.split(":")[0]
        assert config_file.resolve() == (DEPLOY / "k8s" / "ccproxy.yaml").resolve()  # one fleet config
        env = svc["environment"]
        assert env["CCPROXY_CONFIG"] == CONFIG_PATH
    # Every ${VAR} the config needs is given by the Compose environment.
    config_text = re.sub(r"#.*", "", (DEPLOY / "k8s" / "ccproxy.yaml").read_text())
    needed = set(re.findall(r"\$\{([A-Za-z_]+)\}", config_text))
    assert needed
    assert needed <= set(services[replicas[0]]["environment"])
