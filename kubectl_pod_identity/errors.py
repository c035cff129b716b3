"""The two ways a command fails, each with its exit status (0 is success)."""

from __future__ import annotations


class PluginError(Exception):
    exit_status = 1


class UsageError(PluginError):
    """Bad arguments or configuration: nothing was sent to the cluster (exit 2)."""

    exit_status = 2


class Refused(PluginError):
    """The operation was refused: by the API server, or by a check against the cluster's state
    (already exists, not found, a limit reached), or the cluster could not be reached (exit 1)."""

    exit_status = 1
