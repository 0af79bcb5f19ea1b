"""The node agent: keys and CSRs made locally, certificates from an
Istio-compatible CA, served to Envoy over SDS and rotated before expiry."""
