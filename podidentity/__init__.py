"""The core both daemons stand on: the pod-identity object model and cluster state, the Kubernetes
layer, the IMDS token client, the HTTP server and probes, and command-line argument types.

It imports neither daemon (``nmi``, ``mic``) nor the stand-ins; tests/test_architecture.py holds
that shape.
"""

__version__ = "0.1.0"
