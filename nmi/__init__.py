"""Node Managed Identity: Azure AD tokens for Kubernetes pods without secrets in their images."""

__version__ = "0.1.0"
