"""``--cluster-state``: the cluster read from a YAML file instead of the Kubernetes API.

The file holds Kubernetes objects (multi-document, or a ``List``). It is re-read when it changes;
a file that fails to parse is reported and the state it would have replaced is kept whole, so a
bad edit never empties the node's identities.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from podidentity.errors import ConfigError
from podidentity.model import KIND_OF, KINDS, KubeObject, Pod, parse_object
from podidentity.state import ClusterState

log = logging.getLogger("nmi.cluster_file")
SOURCE = "cluster-state-file"


def parse_documents(text: str, *, origin: str = "<string>") -> list[KubeObject]:
    """Every object in ``text``; raises ``ConfigError`` naming the document that is wrong."""
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from None
    objects: list[KubeObject] = []
    for index, document in enumerate(documents, start=1):
        items: list[Any]
        if isinstance(document, Mapping) and document.get("kind") == "List":
            items = list(document.get("items") or [])
        else:
            items = [document]
        for item in items:
            try:
                objects.append(parse_object(item))
            except ConfigError as exc:
                raise ConfigError(f"{origin}: document {index}: {exc}") from None
    return objects


def load(path: str | os.PathLike[str]) -> list[KubeObject]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read cluster state {path}: {exc.strerror}") from None
    return parse_documents(text, origin=str(path))


def apply_objects(state: ClusterState, objects: list[KubeObject], *, node_name: str) -> None:
    """Replace every kind at once; pods on other nodes are left out as a field selector would."""
    by_kind: dict[str, list[KubeObject]] = {kind.name: [] for kind in KINDS}
    for obj in objects:
        if isinstance(obj, Pod) and node_name and obj.node_name != node_name:
            continue
        by_kind[KIND_OF[type(obj)].name].append(obj)
    for kind, items in by_kind.items():
        state.replace(kind, items)


def _signature(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ClusterStateFile:
    """Loads the file once (fatal if bad at start), then reloads it when it changes."""

    def __init__(self, path: str, state: ClusterState, *, node_name: str, poll_s: float) -> None:
        self.path = path
        self._state = state
        self._node = node_name
        self._poll_s = poll_s
        self._signature: tuple[int, int, int] | None = None
        self.last_error: str | None = None
        self.reloads = 0
        state.register_source(SOURCE)

    def load_initial(self) -> None:
        self._signature = _signature(self.path)
        apply_objects(self._state, load(self.path), node_name=self._node)
        self._state.mark_synced(SOURCE)
        log.info("loaded cluster state from %s", self.path)

    async def run(self) -> None:
        # Polling a stat() is cheap and survives editors that replace the file (new inode),
        # which inotify on the path itself would miss.
        while True:
            await asyncio.sleep(self._poll_s)
            signature = _signature(self.path)
            if signature == self._signature:
                continue
            self._signature = signature
            await self.reload()

    async def reload(self) -> bool:
        try:
            objects = await asyncio.to_thread(load, self.path)
        except ConfigError as exc:
            self.last_error = str(exc)
            log.error("cluster state not reloaded, keeping the previous one: %s", exc)
            return False
        apply_objects(self._state, objects, node_name=self._node)
        self.last_error = None
        self.reloads += 1
        log.info("reloaded cluster state from %s (%d objects)", self.path, len(objects))
        return True
