"""The deploy files keep their promises: no service runs as root, pods run under the runtime's
seccomp profile without a service-account token, the network policies fence replicas and
PostgreSQL, and no secret (not even a placeholder) is written in them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
K8S = REPO / "deploy" / "k8s"
SYSTEMD = REPO / "deploy" / "systemd" / "inferq.service"

# A value that is a secret written down rather than taken from the environment or a file.
_SECRET_KEY = re.compile(r"PASSWORD|TOKEN|SECRET|_KEY$", re.I)
_INTERPOLATED = re.compile(r"^\$\{[A-Z_]+:\?[^}]+\}$")


def _k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _k8s_documents() if d["kind"] == kind]


def _labels(selector: dict[str, Any]) -> dict[str, str]:
    return dict(selector.get("matchLabels", {}))


def test_no_compose_service_runs_as_root() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert services
    for name, service in services.items():
        user = str(service.get("user", ""))
        assert user, f"{name} states no user: images default to root"
        uid = user.split(":")[0]
        assert uid not in ("0", "root"), f"{name} runs as root"
        assert uid.isdigit() and int(uid) > 0, f"{name}: user {user!r}"


def test_compose_writes_no_secret_and_publishes_on_loopback_only() -> None:
    text = COMPOSE.read_text()
    compose = yaml.safe_load(text)
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        for key, value in env.items():
            if _SECRET_KEY.search(key):
                assert _INTERPOLATED.match(str(value)), f"{name}: {key} is written down"
        url = str(env.get("INFERQ_DATABASE_URL", ""))
        if url:
            password = url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
            assert _INTERPOLATED.match(password), f"{name}: the database password is written"
        command = " ".join(map(str, service.get("command") or []))
        assert "--token " not in command and "--token=" not in command, name
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every address"
    assert "$(cat" not in text


def test_pods_run_under_seccomp_without_a_service_account_token() -> None:
    templates = [d["spec"]["template"] for d in _by_kind("Deployment") + _by_kind("Job")]
    assert len(templates) >= 2
    for template in templates:
        spec = template["spec"]
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]


def test_no_secret_is_committed_in_the_manifests() -> None:
    assert _by_kind("Secret") == []
    for deployment in _by_kind("Deployment") + _by_kind("Job"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for env in container.get("env", []):
                if env["name"].endswith("DATABASE_URL") or _SECRET_KEY.search(env["name"]):
                    assert "value" not in env, f"{env['name']} is written in the manifest"
                    assert env["valueFrom"]["secretKeyRef"]["name"]


def test_network_policies_fence_replicas_and_postgres() -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in _by_kind("NetworkPolicy")}
    server = {"app.kubernetes.io/name": "inferq", "app.kubernetes.io/component": "server"}
    [replicas] = [p for p in policies.values() if _labels(p["podSelector"]) == server]
    assert set(replicas["policyTypes"]) == {"Ingress", "Egress"}
    api = [
        rule for rule in replicas["ingress"] if {"protocol": "TCP", "port": 8000} in rule["ports"]
    ]
    assert len(api) == 1
    # Only the load balancer's pods reach the API port.
    [peer] = api[0]["from"]
    assert _labels(peer["podSelector"]) == {"app.kubernetes.io/name": "ingress-nginx"}
    assert "namespaceSelector" in peer
    for rule in replicas["ingress"]:
        assert rule["from"], "an ingress rule without `from` admits everyone"
    reached = {
        next(iter(_labels(peer.get("podSelector", {})).values()), None)
        for rule in replicas["egress"]
        for peer in rule["to"]
    }
    assert reached == {"pgbouncer", "postgres", "kube-dns"}
    # Only inferq's own pods (and PgBouncer, and KEDA's operator) reach PostgreSQL.
    [postgres] = [
        p for p in policies.values()
        if _labels(p["podSelector"]) == {"app.kubernetes.io/name": "postgres"}
    ]  # fmt: skip
    assert postgres["policyTypes"] == ["Ingress"]
    peers = [_labels(peer["podSelector"]) for rule in postgres["ingress"] for peer in rule["from"]]
    assert peers == [
        {"app.kubernetes.io/name": "inferq"},
        {"app.kubernetes.io/name": "pgbouncer"},
        {"app": "keda-operator"},  # the workers' scaling query (worker-autoscaling.yaml)
    ]
    [keda] = [
        peer for rule in postgres["ingress"] for peer in rule["from"] if "namespaceSelector" in peer
    ]
    assert _labels(keda["namespaceSelector"]) == {"kubernetes.io/metadata.name": "keda"}
    for rule in postgres["ingress"]:
        assert rule["ports"] == [{"protocol": "TCP", "port": 5432}]


def test_the_systemd_unit_runs_unprivileged_with_secrets_in_a_file() -> None:
    unit = SYSTEMD.read_text()
    directives = [line for line in unit.splitlines() if line and not line.startswith("#")]
    assert "User=inferq" in directives
    assert any(d.startswith("EnvironmentFile=") for d in directives)
    assert "UMask=0077" in directives
    for line in directives:
        if line.startswith("Environment="):
            key = line.removeprefix("Environment=").split("=", 1)[0]
            assert not _SECRET_KEY.search(key) and "DATABASE_URL" not in key, line
