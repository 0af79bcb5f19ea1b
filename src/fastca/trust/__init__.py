"""Publishing the CA's trust bundle where workloads read it.

``kubernetes``: the ConfigMap ``istio-ca-root-cert`` (key ``root-cert.pem``)
in every namespace, as istiod publishes it, written by one replica at a time
under a Kubernetes Lease. This package is lifecycle, off the signing path:
it receives the bundle PEM and never imports the issuing layers.
"""

from fastca.trust.config import KubernetesTrustConfig, TrustConfig

__all__ = ["KubernetesTrustConfig", "TrustConfig"]
