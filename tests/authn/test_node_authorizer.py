"""Impersonation by a trusted node agent (docs/reliability.md, case 6), with pod facts
from a file."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from fastca.authn.caller import Caller, KubernetesInfo
from fastca.authn.config import AuthnConfig, build_node_authorizer
from fastca.authn.node_authorizer import NodeAuthorizer, Pod, StaticPodSource
from fastca.errors import AuthenticationFailed, ConfigurationError

TD = "cluster.local"
PODS = [
    {"namespace": "istio-system", "name": "ztunnel-abc", "uid": "z1", "service_account": "ztunnel", "node_name": "n1"},
    {"namespace": "default", "name": "sleep-1", "uid": "s1", "service_account": "sleep", "node_name": "n1"},
    {"namespace": "default", "name": "httpbin-1", "uid": "h1", "service_account": "httpbin", "node_name": "n2"},
]
SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
HTTPBIN = "spiffe://cluster.local/ns/default/sa/httpbin"


def ztunnel(pod_name: str | None = "ztunnel-abc", pod_uid: str | None = "z1", namespace: str = "istio-system",
            account: str = "ztunnel") -> Caller:
    return Caller(identities=(f"spiffe://{TD}/ns/{namespace}/sa/{account}",), credential_type="k8s-tokenreview",
                  kubernetes=KubernetesInfo(namespace, account, pod_name, pod_uid))


@pytest.fixture
def pod_file(tmp_path: Path) -> Path:
    path = tmp_path / "pods.json"
    path.write_text(json.dumps({"pods": PODS}))
    return path


def authorize(authorizer: NodeAuthorizer, caller: Caller, identity: str, trust_domain: str = TD) -> str:
    return asyncio.run(authorizer.authorize(caller, identity, trust_domain))


def test_node_agent_may_ask_for_a_workload_on_its_node(pod_file):
    authorizer = NodeAuthorizer({"istio-system/ztunnel"}, StaticPodSource(pod_file))
    assert authorize(authorizer, ztunnel(), SLEEP) == "n1"     # allowed: the caller's node, for the record


DENIAL_REASONS = {
    "no_trusted_accounts": "no trusted node accounts", "caller_not_trusted": "not a trusted node account",
    "workload_on_another_node": "no pod of default/httpbin on node n1", "wrong_pod_uid": "another uid",
    "unknown_caller_pod": "not found", "caller_pod_other_account": "runs another service account",
    "no_pod_in_token": "names no pod", "certificate_caller": "no Kubernetes identity",
    "requested_not_spiffe": "requested identity", "requested_other_trust_domain": "requested identity",
    "requested_extra_path": "requested identity", "nobody_with_that_account": "no pod of default/ghost",
}


@pytest.mark.parametrize("case", ["no_trusted_accounts", "caller_not_trusted", "workload_on_another_node",
                                  "wrong_pod_uid", "unknown_caller_pod", "caller_pod_other_account",
                                  "no_pod_in_token", "certificate_caller", "requested_not_spiffe",
                                  "requested_other_trust_domain", "requested_extra_path", "nobody_with_that_account"])
def test_impersonation_denied(pod_file, case):
    trusted = {"istio-system/ztunnel"}
    caller, identity = ztunnel(), SLEEP
    if case == "no_trusted_accounts":
        trusted = set()
    elif case == "caller_not_trusted":
        caller = ztunnel("sleep-1", "s1", "default", "sleep")
    elif case == "workload_on_another_node":
        identity = HTTPBIN
    elif case == "wrong_pod_uid":
        caller = ztunnel(pod_uid="z0")
    elif case == "unknown_caller_pod":
        caller = ztunnel(pod_name="ztunnel-gone")
    elif case == "caller_pod_other_account":
        trusted = {"istio-system/ztunnel", "default/sleep"}
        caller = ztunnel("httpbin-1", "h1", "default", "sleep")   # token says sleep, pod runs httpbin
    elif case == "no_pod_in_token":
        caller = ztunnel(pod_name=None, pod_uid=None)
    elif case == "certificate_caller":
        caller = Caller(identities=(f"spiffe://{TD}/ns/istio-system/sa/ztunnel",), credential_type="mtls")
    elif case == "requested_not_spiffe":
        identity = "sleep.default.svc"
    elif case == "requested_other_trust_domain":
        identity = "spiffe://other.domain/ns/default/sa/sleep"
    elif case == "requested_extra_path":
        identity = SLEEP + "/x"
    elif case == "nobody_with_that_account":
        identity = "spiffe://cluster.local/ns/default/sa/ghost"
    authorizer = NodeAuthorizer(trusted, StaticPodSource(pod_file))
    with pytest.raises(AuthenticationFailed, match=DENIAL_REASONS[case]) as info:
        authorize(authorizer, caller, identity)
    assert info.value.public_message == "request impersonation authentication failure"


def test_pod_file_is_reread_when_it_changes_and_a_broken_rewrite_is_ignored(pod_file):
    source = StaticPodSource(pod_file)
    authorizer = NodeAuthorizer({"istio-system/ztunnel"}, source)
    with pytest.raises(AuthenticationFailed):
        authorize(authorizer, ztunnel(), HTTPBIN)
    moved = [dict(p, node_name="n1") if p["name"] == "httpbin-1" else p for p in PODS]
    pod_file.write_text(json.dumps({"pods": moved}, indent=1))
    authorize(authorizer, ztunnel(), HTTPBIN)
    pod_file.write_text("{ not json")
    os.utime(pod_file, ns=(1, 1))
    authorize(authorizer, ztunnel(), HTTPBIN)            # last good list kept
    assert asyncio.run(source.get_pod("default", "httpbin-1")) == Pod("default", "httpbin-1", "h1", "httpbin", "n1")


def test_toml_pod_file(tmp_path):
    path = tmp_path / "pods.toml"
    path.write_text("".join(
        f'[[pods]]\nnamespace = "{p["namespace"]}"\nname = "{p["name"]}"\nuid = "{p["uid"]}"\n'
        f'service_account = "{p["service_account"]}"\nnode_name = "{p["node_name"]}"\n\n' for p in PODS))
    source = StaticPodSource(path)
    assert {p.name for p in asyncio.run(source.pods_on_node("n1"))} == {"ztunnel-abc", "sleep-1"}
    authorize(NodeAuthorizer({"istio-system/ztunnel"}, source), ztunnel(), SLEEP)


@pytest.mark.parametrize("content", ["[]x", json.dumps({"pods": [{"namespace": "a"}]}), json.dumps({"pods": 3})])
def test_bad_pod_file_at_start_is_a_configuration_error(tmp_path, content):
    path = tmp_path / "pods.json"
    path.write_text(content)
    with pytest.raises(ConfigurationError):
        StaticPodSource(path)
    with pytest.raises(ConfigurationError):
        StaticPodSource(tmp_path / "absent.json")


def test_built_from_config(pod_file):
    assert build_node_authorizer(AuthnConfig(), trust_domain=TD) is None
    config = AuthnConfig.model_validate({"node_authorizer": {
        "trusted_node_accounts": ["istio-system/ztunnel"], "pod_source": "static", "static_file": pod_file.name}})
    authorizer = build_node_authorizer(config, trust_domain=TD, base_dir=pod_file.parent)
    assert authorizer is not None
    asyncio.run(authorizer.authorize(ztunnel(), SLEEP))  # trust domain from construction
    with pytest.raises(AuthenticationFailed):
        asyncio.run(authorizer.authorize(ztunnel(), HTTPBIN))
