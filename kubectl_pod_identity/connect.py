"""Which cluster to talk to, found as kubectl finds it.

``--kubeconfig``, else ``$KUBECONFIG`` (one file or several joined by ``:``), else
``~/.kube/config`` when it exists, else the in-cluster service account; ``--context`` picks a
context other than the file's ``current-context``. The core's ``load_connection`` reads the file
(static credentials itself, ``exec`` plugins and merged files through ``kubernetes_asyncio``);
for ``--context`` this module first writes a private copy of the (merged) kubeconfig with that
context current and every relative file reference made absolute, and removes it once loaded.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kubectl_pod_identity.errors import UsageError
from podidentity.errors import ConfigError
from podidentity.kube.config import Connection, load_connection
from podidentity.kube.settings import KubeSettings

_FILE_FIELDS = {
    "clusters": ("cluster", ("certificate-authority",)),
    "users": ("user", ("client-certificate", "client-key", "tokenFile")),
}


def kubeconfig_path(kubeconfig: str | None, environ: Mapping[str, str]) -> str | None:
    """The kubeconfig kubectl would use, or None for in-cluster configuration."""
    if kubeconfig:
        return kubeconfig
    if environ.get("KUBECONFIG"):
        return environ["KUBECONFIG"]
    home = environ.get("HOME") or os.path.expanduser("~")
    default = Path(home, ".kube", "config")
    return str(default) if default.is_file() else None


async def connect(
    kubeconfig: str | None,
    context: str | None,
    settings: KubeSettings,
    *,
    environ: Mapping[str, str] | None = None,
) -> Connection:
    env = os.environ if environ is None else environ
    try:
        path = await asyncio.to_thread(kubeconfig_path, kubeconfig, env)
        if path is None:
            if context:
                raise UsageError(
                    f"--context {context!r}: no kubeconfig (--kubeconfig, KUBECONFIG or ~/.kube/config)"
                )
            return await load_connection(None, settings, environ=env)
        if not context:
            return await load_connection(path, settings, environ=env)
        with tempfile.TemporaryDirectory(prefix="kubectl-pod_identity-") as tmp:
            copy = await asyncio.to_thread(_write_with_context, path, context, tmp)
            return await load_connection(copy, settings, environ=env)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc


def _write_with_context(path: str, context: str, directory: str) -> str:
    """A private (0600) copy of the kubeconfig with ``context`` current: it may hold credentials."""
    target = os.path.join(directory, "kubeconfig")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump(with_context(path, context), f, sort_keys=False)
    return target


def with_context(path: str, context: str) -> dict[str, Any]:
    """The kubeconfig(s) at ``path`` merged as kubectl merges them (the first file to name a
    cluster, user or context wins; missing files in a list are skipped), with ``context`` current."""
    merged: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [],
        "users": [],
        "contexts": [],
    }
    seen: dict[str, set[str]] = {"clusters": set(), "users": set(), "contexts": set()}
    files = [p for p in path.split(os.pathsep) if p]
    found = False
    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                doc = yaml.safe_load(f)
        except FileNotFoundError:
            if len(files) == 1:
                raise ConfigError(f"kubeconfig {file} does not exist") from None
            continue
        except OSError as exc:
            raise ConfigError(f"cannot read kubeconfig {file}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"kubeconfig {file} is not valid YAML: {exc}") from exc
        if not isinstance(doc, Mapping):
            raise ConfigError(f"kubeconfig {file}: expected a mapping")
        found = True
        base = os.path.dirname(os.path.abspath(file))
        for section in ("clusters", "users", "contexts"):
            for entry in doc.get(section) or ():
                if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
                    continue
                if entry["name"] in seen[section]:
                    continue
                seen[section].add(entry["name"])
                merged[section].append(_absolute(section, dict(entry), base))
    if not found:
        raise ConfigError(f"no kubeconfig found in {path}")
    if context not in seen["contexts"]:
        names = ", ".join(sorted(seen["contexts"])) or "none"
        raise ConfigError(f"context {context!r} not found in kubeconfig {path} (contexts: {names})")
    merged["current-context"] = context
    return merged


def _absolute(section: str, entry: dict[str, Any], base: str) -> dict[str, Any]:
    if section not in _FILE_FIELDS:
        return entry
    key, fields = _FILE_FIELDS[section]
    body = entry.get(key)
    if isinstance(body, Mapping):
        body = dict(body)
        for name in fields:
            value = body.get(name)
            if isinstance(value, str) and value and not os.path.isabs(value):
                body[name] = os.path.join(base, value)
        entry[key] = body
    return entry
