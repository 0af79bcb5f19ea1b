"""Publishing the CA's trust bundle where workloads read it.

``bundle``: the live bundle (own roots + peers'), read by everything that
hands roots out. ``peers``: ``[trust.peers]``, other meshes' roots fetched
and validated every sync interval. ``kubernetes``: the ConfigMap ``istio-ca-root-cert`` (key ``root-cert.pem``)
in every namespace, as istiod publishes it, written by one replica at a time
under a Kubernetes Lease. This package is lifecycle, off the signing path:
it receives the bundle PEM and never imports the issuing layers.
"""

from fastca.trust.config import KubernetesTrustConfig, PeersConfig, TrustConfig

__all__ = ["KubernetesTrustConfig", "PeersConfig", "TrustConfig"]
