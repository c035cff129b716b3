"""Counters under the original's exact names, and the text exposition that shows them as counters.

aad-pod-identity exported its counters through OpenCensus as ``aadpodidentity_<name>_count`` with
no ``_total`` suffix (mic-spec §5, nmi-spec §6), and users' dashboards and alerts query those names.
prometheus_client always appends ``_total`` to a counter, so these are ``PlainCounter`` collectors:
their samples carry the exact name, and ``render`` labels their families ``counter`` again.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector


class _Child:
    __slots__ = ("_lock", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        with self._lock:
            self.value += amount


class PlainCounter(Collector):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _Child] = {}
        if not self._labelnames:
            self._children[()] = _Child()
        registry.register(self)
        _PLAIN.setdefault(registry, set()).add(name)

    def labels(self, *values: str, **by_name: str) -> _Child:
        if by_name:
            values = tuple(by_name[n] for n in self._labelnames)
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self.name}: expected labels {self._labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children.setdefault(values, _Child())
        return child

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def describe(self) -> Iterator[Metric]:
        yield Metric(self.name, self._documentation, "unknown")

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self.name, self._documentation, "unknown")
        for values, child in list(self._children.items()):
            metric.add_sample(self.name, dict(zip(self._labelnames, values, strict=True)), child.value)
        yield metric


_PLAIN: weakref.WeakKeyDictionary[CollectorRegistry, set[str]] = weakref.WeakKeyDictionary()
"""The ``PlainCounter`` names of each registry."""


def render(registry: CollectorRegistry) -> bytes:
    """The text format, with the registry's ``PlainCounter`` families typed ``counter``."""
    text = generate_latest(registry)
    counters = _PLAIN.get(registry)
    if not counters:
        return text
    lines = text.split(b"\n")
    for i, line in enumerate(lines):
        if line.startswith(b"# TYPE ") and line.endswith(b" untyped"):
            name = line[7:-8].decode()
            if name in counters:
                lines[i] = b"# TYPE " + line[7:-8] + b" counter"
    return b"\n".join(lines)
