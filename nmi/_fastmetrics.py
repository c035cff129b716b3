"""Counters and histograms for the request hot path, exposed through a scrape-time collector.

prometheus_client's ``observe``/``inc`` take a lock and do more bookkeeping than a
single-threaded event loop needs (about 1 µs each). Here a child is a list of ints and a float;
the families are built only when ``/metrics`` is scraped, which happens on the same loop.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector


class HistogramChild:
    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left finds the first bucket whose upper bound is >= value: Prometheus' "le".
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class _Family(Collector):
    def __init__(self, name: str, doc: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        self._name = name
        self._doc = doc
        self._labelnames = tuple(labelnames)
        registry.register(self)

    def _key(self, values: tuple[str, ...], kwargs: dict[str, str]) -> tuple[str, ...]:
        if kwargs:
            values = tuple(kwargs[name] for name in self._labelnames)
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
        return tuple(str(v) for v in values)

    def describe(self) -> list[Metric]:
        return []


class LightHistogram(_Family):
    def __init__(
        self,
        name: str,
        doc: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._bounds = tuple(float(b) for b in buckets)
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        super().__init__(name, doc, labelnames, registry)

    def labels(self, *values: str, **kwargs: str) -> HistogramChild:
        key = self._key(values, kwargs)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = HistogramChild(self._bounds)
        return child

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, child in self._children.items():
            running = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip(self._bounds, child.counts, strict=False):
                running += count
                buckets.append((_fmt(bound), running))
            buckets.append(("+Inf", running + child.counts[-1]))
            family.add_metric(list(values), buckets, child.sum)
        yield family


class LightCounter(_Family):
    def __init__(
        self, name: str, doc: str, labelnames: Sequence[str], *, registry: CollectorRegistry
    ) -> None:
        self._children: dict[tuple[str, ...], CounterChild] = {}
        super().__init__(name, doc, labelnames, registry)

    def labels(self, *values: str, **kwargs: str) -> CounterChild:
        key = self._key(values, kwargs)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = CounterChild()
        return child

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, child in self._children.items():
            family.add_metric(list(values), child.value)
        yield family


def _fmt(bound: float) -> str:
    return str(int(bound)) + ".0" if bound == int(bound) else repr(bound)
