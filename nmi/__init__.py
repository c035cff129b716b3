"""Node Managed Identity: Azure AD tokens for Kubernetes pods without secrets in their images."""

from podidentity import __version__

__all__ = ["__version__"]
