"""fastca: a high-performance certificate authority for service meshes."""

__version__ = "0.1.0"
