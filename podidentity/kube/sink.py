"""The sink that feeds one kind of a watch into ``ClusterState``."""

from __future__ import annotations

import logging
from collections.abc import Callable

from podidentity.model import KIND_OF, Kind, KubeObject, ObjectKey
from podidentity.state import ClusterState

log = logging.getLogger("podidentity.kube")


class StateSink:
    """Writes one kind into ``ClusterState``.

    ``on_added`` hears of keys the state had not held (NMI's warm start); ``on_change`` of every
    change (MIC's reconciler marks itself dirty). Hooks run synchronously and must not block.
    """

    def __init__(
        self,
        state: ClusterState,
        kind: Kind,
        source: str,
        *,
        on_added: Callable[[KubeObject], None] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._state = state
        self._kind = kind
        self._source = source
        self._on_added = on_added
        self._on_change = on_change
        state.register_source(source)

    def replace(self, objects: list[KubeObject]) -> None:
        # Objects of another kind cannot come from this resource's path; drop rather than mis-file.
        objects = [o for o in objects if KIND_OF[type(o)] is self._kind]
        added: list[KubeObject] = []
        if self._on_added is not None:
            added = [o for o in objects if self._state.get(self._kind.cls, o.key) is None]
        self._state.replace(self._kind.name, objects)
        for obj in added:
            self._added(obj)
        self._changed()

    def apply(self, obj: KubeObject) -> None:
        if KIND_OF[type(obj)] is not self._kind:
            return
        held = self._state.get(self._kind.cls, obj.key)
        if held == obj:
            # The echo of a write already applied to the cache (MIC's write-through), or a resync:
            # nothing changed, so nobody is woken (a 2,000-pod burst was ~5 idle reconciles a second).
            return
        self._state.apply(obj)
        if held is None and self._on_added is not None:
            self._added(obj)
        self._changed()

    def remove(self, key: ObjectKey) -> None:
        self._state.remove(self._kind.name, key)
        self._changed()

    def count(self) -> int:
        return self._state.count(self._kind.cls)

    def synced(self) -> None:
        self._state.mark_synced(self._source)
        self._changed()

    def _added(self, obj: KubeObject) -> None:
        assert self._on_added is not None
        try:
            self._on_added(obj)
        except Exception:
            # A hook bug must not stop the cache from following the API server.
            log.exception("on_added hook failed for %s %s", self._kind.name, obj.key)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()
