"""``fastca.v1.TrustBundleService/GetTrustBundle``: the root bundle a
CreateCertificate would end with now, for agents that look for a changed
bundle between renewals (a peer's roots added, a root rotation).

The bundle is public (istiod writes it into every namespace), so no
credential is asked for; the call is bounded like any other by the worker's
limits, and answered from bytes serialised once per bundle version.
"""

from __future__ import annotations

import hashlib

from google.protobuf.message import DecodeError

from fastca.authority import Authorities
from fastca.errors import InvalidRequest
from fastca.frontend._grpc import INVALID_ARGUMENT, Call
from fastca.proto import trust_pb2

__all__ = ["TRUST_BUNDLE_SERVICE", "TRUST_BUNDLE_METHOD", "GetTrustBundle"]

TRUST_BUNDLE_SERVICE = "fastca.v1.TrustBundleService"
TRUST_BUNDLE_METHOD = "GetTrustBundle"


class GetTrustBundle:
    streaming = False

    def __init__(self, authorities: Authorities) -> None:
        self._authorities = authorities
        self._answers: dict[str, tuple[str, bytes]] = {}    # signer -> (bundle, serialised response)

    def accepts(self, call: Call) -> bool:
        return True

    def handle(self, call: Call) -> None:
        try:
            signer = trust_pb2.TrustBundleRequest.FromString(call.message).cert_signer
            authority = self._authorities.select(signer)
        except DecodeError:
            call.fail(INVALID_ARGUMENT, "the request is not a TrustBundleRequest message")
            return
        except InvalidRequest as error:
            call.fail(INVALID_ARGUMENT, error.public_message)
            return
        bundle = authority.root_bundle_pem
        cached = self._answers.get(authority.name)
        if cached is None or cached[0] is not bundle:
            version = hashlib.sha256(bundle.encode()).hexdigest()[:16]
            cached = (bundle, trust_pb2.TrustBundleResponse(root_cert=bundle, version=version).SerializeToString())
            self._answers[authority.name] = cached
        call.respond(cached[1])
