"""Who is calling, and may they ask for this identity.

``build_authenticators`` turns the ``[authn]`` configuration into an
``AuthenticatorChain`` (istiod's order: client certificate, OIDC JWT,
Kubernetes TokenReview, XFCC, then plug-ins); ``chain.authenticate(request)``
returns a ``Caller`` or raises ``AuthenticationFailed``.
``build_node_authorizer`` gives the ``NodeAuthorizer`` that decides
impersonation (ztunnel asking for its node's workloads), or None when no
node account is trusted — then impersonation is always denied.
"""

from fastca.authn.caller import Authenticator, Caller, KubernetesInfo, RequestInfo
from fastca.authn.chain import AuthenticatorChain
from fastca.authn.config import (
    AuthnConfig,
    NodeAuthorizerConfig,
    OidcProvider,
    PluginConfig,
    TokenReviewCacheConfig,
    TokenReviewCluster,
    XfccConfig,
    build_authenticators,
    build_node_authorizer,
)
from fastca.authn.k8s_tokenreview import TokenReviewAuthenticator
from fastca.authn.mtls import MtlsAuthenticator
from fastca.authn.node_authorizer import (
    IMPERSONATION_FAILURE,
    KubernetesPodSource,
    NodeAuthorizer,
    Pod,
    PodSource,
    StaticPodSource,
)
from fastca.authn.oidc import OidcAuthenticator
from fastca.authn.plugins import ENTRY_POINT_GROUP, available_plugins, load_plugin
from fastca.authn.xfcc import XfccAuthenticator, XfccElement, parse_xfcc

__all__ = [
    "Authenticator", "Caller", "KubernetesInfo", "RequestInfo",
    "AuthenticatorChain",
    "AuthnConfig", "TokenReviewCluster", "TokenReviewCacheConfig", "OidcProvider", "XfccConfig", "PluginConfig",
    "NodeAuthorizerConfig", "build_authenticators", "build_node_authorizer",
    "MtlsAuthenticator", "TokenReviewAuthenticator", "OidcAuthenticator", "XfccAuthenticator",
    "XfccElement", "parse_xfcc",
    "ENTRY_POINT_GROUP", "available_plugins", "load_plugin",
    "NodeAuthorizer", "Pod", "PodSource", "StaticPodSource", "KubernetesPodSource", "IMPERSONATION_FAILURE",
]
