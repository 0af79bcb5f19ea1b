"""The manifests under deploy/ parse, configure a CA fastca accepts, and
grant what the code asks the API server for."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

from fastca.config import CAConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def _rules(kind: str) -> list[dict]:
    return [rule for d in _documents("rbac.yaml") if d["kind"] == kind for rule in d["rules"]]


def _allowed(rules: list[dict], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


def test_rbac_covers_what_fastca_calls():
    cluster = _rules("ClusterRole")
    assert _allowed(cluster, "authentication.k8s.io", "tokenreviews", "create")
    for verb in ("get", "list", "watch"):
        assert _allowed(cluster, "", "pods", verb)
        assert _allowed(cluster, "", "namespaces", verb)
    for verb in ("get", "list", "watch", "create", "update"):
        assert _allowed(cluster, "", "configmaps", verb)
    assert not _allowed(cluster, "coordination.k8s.io", "leases", "update")    # only in its namespace
    lease = _rules("Role")
    for verb in ("get", "create", "update"):
        assert _allowed(lease, "coordination.k8s.io", "leases", verb)


def test_the_deployment_runs_two_replicas_behind_the_service_and_a_pdb():
    kinds = {d["kind"]: d for d in _documents("deployment.yaml")}
    assert kinds["Deployment"]["spec"]["replicas"] == 2
    assert kinds["PodDisruptionBudget"]["spec"]["minAvailable"] == 1
    assert {p["port"] for p in kinds["Service"]["spec"]["ports"]} == {15012, 15014}
    assert kinds["Deployment"]["spec"]["template"]["spec"]["serviceAccountName"] == "fastca"


def test_the_shipped_configuration_is_valid():
    (config_map,) = _documents("config.yaml")
    config = CAConfig.from_mapping(tomllib.loads(config_map["data"]["fastca.toml"]))
    assert config.trust.kubernetes.enabled and config.audit.backend == "postgresql"
    assert "p11-kit-client.so" in (config.signer.key_uri or "")


def test_the_state_directory_is_mounted_so_a_rotation_reaches_every_replica():
    """Not copied at start (a copy would never see a rotation): the
    configuration, the CA Secret and the optional rotation Secret, projected
    read-only where `fastca serve --state` looks, the plan under rotation/."""
    (deployment,) = [d for d in _documents("deployment.yaml") if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    (container,) = pod["containers"]
    state = container["args"][container["args"].index("--state") + 1]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == state]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    sources = volume["projected"]["sources"]
    assert {"configMap": {"name": "fastca-config"}} in sources
    assert {"secret": {"name": "fastca-ca"}} in sources
    (rotation,) = [s["secret"] for s in sources if s.get("secret", {}).get("name") == "fastca-rotation"]
    assert rotation["optional"] is True
    assert {item["path"] for item in rotation["items"]} == {
        "rotation/plan.toml", "rotation/ca-cert.pem", "rotation/cert-chain.pem", "rotation/root-cert.pem"}
