"""``--cluster-state``: the cluster read from a YAML (or JSON) file instead of the Kubernetes API.

The file holds Kubernetes objects (multi-document, or a ``List``). It is re-read when it changes;
a file that fails to parse is reported and the state it would have replaced is kept whole, so a
bad edit never empties the node's identities.

**An empty file is not a cluster.** A file with no objects at all (0 bytes, only whitespace or
comments, only ``---`` separators, or a ``List`` without items) is what a non-atomic rewrite
(``: > file``, then writing) leaves behind for a while: at start it is a ``ConfigError``, on reload
it is a failed reload like a parse error (the previous state is kept, the error logged and
counted in ``reload_failures``). A file with objects but no pods of this node, or none at all, is
a legitimate cluster (a node without pods exists).

Large files (tens of thousands of objects) are read without stalling requests:

- YAML is parsed with libyaml (``yaml.CSafeLoader``) when PyYAML has it, into plain values by a
  lean constructor; a document that is JSON is read with ``json``;
- the text is split at its document markers, and documents whose outcome is certain without
  parsing are skipped: Pods and AzureAssignedIdentities whose every ``nodeName`` / ``nodename``
  field names another node (NMI would drop them after parsing anyway, as the watch's field and
  label selectors do);
- each document's parsed objects are remembered by a digest of its text, so a reload parses only
  the documents that changed;
- parsing and the diff against what was last applied run in a worker thread; only the changes are
  applied on the event loop, in small chunks with a yield between them.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import itertools
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from podidentity.errors import ConfigError
from podidentity.model import (
    KIND_OF,
    KINDS,
    AzureAssignedIdentity,
    KubeObject,
    ObjectKey,
    Pod,
    parse_object,
)
from podidentity.state import ClusterState

log = logging.getLogger("nmi.cluster_file")
SOURCE = "cluster-state-file"

APPLY_CHUNK = 500
"""Objects changed per event-loop turn on reload: a few milliseconds of work at most."""

_BaseLoader: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[misc]
    """libyaml's safe loader, remembering the tag of each plain scalar it resolved: a file of
    Kubernetes objects repeats the same keys and values thousands of times."""

    _resolved: dict[str, str] = {}  # shared by every loader: the resolution depends on the value only

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is yaml.ScalarNode and implicit[0] and not self.yaml_path_resolvers:
            tag = self._resolved.get(value)
            if tag is None:
                tag = super().resolve(kind, value, implicit)
                if len(self._resolved) < 100_000:
                    self._resolved[value] = tag
            return tag
        return super().resolve(kind, value, implicit)


_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_DOCUMENT_START = re.compile(r"^---(?=[ \t\r\n]|$)", re.M)
_DOCUMENT_START_BYTES = re.compile(rb"^---(?=[ \t\r\n]|$)", re.M)
_TOP_KIND = re.compile(r"^kind:[ \t]*[\"']?([A-Za-z]+)[\"']?[ \t]*(?:#.*)?$", re.M)
# Every spelling of the node field in a document, and the clean ``field: value`` forms of it.
_NODE_FIELD = {"Pod": "nodeName", "AzureAssignedIdentity": "nodename"}
_NODE_VALUE = {
    kind: re.compile(
        rf"(?<![\w.-])[\"']?{name}[\"']?[ \t]*:[ \t]*"
        rf"[\"']?([A-Za-z0-9][A-Za-z0-9._-]*)[\"']?(?=[ \t]*(?:[,}}\r\n#]|$))"
    )
    for kind, name in _NODE_FIELD.items()
}


class _NotPlain(Exception):
    """A document the lean constructor does not handle (merge keys, recursion): use PyYAML's."""


def _construct(loader: Any, node: yaml.Node, path: set[int]) -> Any:
    if isinstance(node, yaml.ScalarNode):
        if node.tag == _STR_TAG:
            return node.value
        return loader.construct_object(node, deep=True)
    if id(node) in path:
        raise _NotPlain
    path.add(id(node))
    try:
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    raise _NotPlain
                key = _construct(loader, key_node, path)
                try:
                    result[key] = _construct(loader, value_node, path)
                except TypeError:  # an unhashable key: PyYAML says what is wrong
                    raise _NotPlain from None
            return result
        if isinstance(node, yaml.SequenceNode):
            return [_construct(loader, item, path) for item in node.value]
    finally:
        path.discard(id(node))
    return loader.construct_object(node, deep=True)


def _yaml_documents(text: str) -> Iterator[Any]:
    loader = _Loader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            try:
                yield _construct(loader, node, set())
            except _NotPlain:
                yield loader.construct_document(node)
            loader.constructed_objects = {}
    finally:
        loader.dispose()


def _documents(text: str) -> Iterator[Any]:
    """The values of the documents in ``text`` (None for an empty one)."""
    body = text.lstrip()
    if body.startswith("---"):
        body = body[3:].lstrip(" \t")
    if body[:1] in ("{", "["):
        try:
            yield json.loads(body)
            return
        except ValueError:
            pass  # YAML flow style, or more than one document: the YAML parser says
    yield from _yaml_documents(text)


def _split(data: bytes) -> list[bytes]:
    """``data`` cut before each ``---`` document marker (never inside a scalar: YAML forbids it).

    Only small steps on the whole file (each match, each chunk): a regex scan or a decode of tens
    of megabytes in one call would hold the GIL, and so the event loop, for a long time.
    """
    starts = [m.start() for m in _DOCUMENT_START_BYTES.finditer(data)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    starts.append(len(data))
    chunks = [data[a:b] for a, b in itertools.pairwise(starts) if a < b]
    if any(c.startswith(b"%") or b"\n%" in c for c in chunks):
        return [data]  # %YAML / %TAG apply to the document after them: keep the stream whole
    return chunks


def _elsewhere(chunk: str, node_name: str) -> bool:
    """True if ``chunk`` is one Pod / AzureAssignedIdentity document every node field of which
    names another node: its objects would be dropped after parsing anyway."""
    kinds = _TOP_KIND.findall(chunk)
    if len(kinds) != 1 or kinds[0] not in _NODE_FIELD:
        return False
    name = _NODE_FIELD[kinds[0]]
    values = _NODE_VALUE[kinds[0]].findall(chunk)
    return bool(values) and len(values) == chunk.count(name) and all(v != node_name for v in values)


def _keep(obj: KubeObject, node_name: str) -> bool:
    """Objects of other nodes are left out, as the watch's field and label selectors do."""
    if not node_name:
        return True
    if isinstance(obj, Pod):
        return obj.node_name == node_name
    if isinstance(obj, AzureAssignedIdentity):
        return not obj.node_name or obj.node_name == node_name
    return True


def _items(document: Any) -> list[Any]:
    if isinstance(document, Mapping) and document.get("kind") == "List":
        return list(document.get("items") or [])
    return [document]


def parse_documents(text: str, *, origin: str = "<string>") -> list[KubeObject]:
    """Every object in ``text``; raises ``ConfigError`` naming the document that is wrong."""
    try:
        documents = [d for d in _documents(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from None
    objects: list[KubeObject] = []
    for index, document in enumerate(documents, start=1):
        for item in _items(document):
            try:
                objects.append(parse_object(item))
            except ConfigError as exc:
                raise ConfigError(f"{origin}: document {index}: {exc}") from None
    return objects


def load(path: str | os.PathLike[str]) -> list[KubeObject]:
    return parse_documents(_read_text(path), origin=str(path))


def _read_text(path: str | os.PathLike[str]) -> str:
    return _decode(_read_bytes(path), path)


def _read_bytes(path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read cluster state {path}: {exc.strerror}") from None


def _decode(data: bytes, path: str | os.PathLike[str]) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8: {exc}") from None


@dataclass(frozen=True, slots=True)
class _Parsed:
    """What one document chunk gave: the objects this node keeps, how many objects and documents
    it held (a chunk skipped unparsed counts as one of each)."""

    kept: tuple[KubeObject, ...]
    objects: int
    documents: int


@dataclass
class Snapshot:
    """One reading of the file: the objects this node keeps, by kind and key."""

    objects: dict[str, dict[ObjectKey, KubeObject]]
    total: int
    """Objects in the file, kept or not: 0 means the file is empty."""
    parsed: dict[bytes, _Parsed] = field(default_factory=dict)
    """Per document's digest: what parsing it gave (reused by the next reload)."""

    @property
    def kept(self) -> int:
        return sum(len(v) for v in self.objects.values())


def read_snapshot(
    path: str | os.PathLike[str],
    *,
    node_name: str,
    previous: Mapping[bytes, _Parsed] | None = None,
) -> Snapshot:
    """Read and parse the file (documents unchanged since ``previous`` are not parsed again)."""
    origin = str(path)
    data = _read_bytes(path)
    previous = previous or {}
    by_kind: dict[str, dict[ObjectKey, KubeObject]] = {kind.name: {} for kind in KINDS}
    parsed: dict[bytes, _Parsed] = {}
    total = 0
    documents = 0
    for raw in _split(data):
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        entry = parsed.get(digest) or previous.get(digest)
        if entry is None:
            chunk = _decode(raw, path)
            if node_name and _elsewhere(chunk, node_name):
                entry = _Parsed((), 1, 1)
            else:
                entry = _parse_chunk(chunk, origin, documents, data, node_name)
        parsed[digest] = entry
        documents += entry.documents
        total += entry.objects
        for obj in entry.kept:
            by_kind[KIND_OF[type(obj)].name][obj.key] = obj
    return Snapshot(by_kind, total, parsed)


def _parse_chunk(chunk: str, origin: str, before: int, data: bytes, node_name: str) -> _Parsed:
    try:
        documents = [d for d in _documents(chunk) if d is not None]
    except yaml.YAMLError:
        # Parse the whole stream again for the error, so its line numbers are the file's.
        try:
            for _ in _documents(_decode(data, origin)):
                pass
        except yaml.YAMLError as exc:
            raise ConfigError(f"{origin}: not valid YAML: {exc}") from None
        raise  # pragma: no cover - the chunk failed, so the whole stream fails too
    kept: list[KubeObject] = []
    count = 0
    for offset, document in enumerate(documents, start=1):
        for item in _items(document):
            try:
                obj = parse_object(item)
            except ConfigError as exc:
                raise ConfigError(f"{origin}: document {before + offset}: {exc}") from None
            count += 1
            if _keep(obj, node_name):
                kept.append(obj)
    return _Parsed(tuple(kept), count, len(documents))


def apply_objects(state: ClusterState, objects: list[KubeObject], *, node_name: str) -> None:
    """Replace every kind at once; objects of other nodes are left out as the watches' selectors do."""
    by_kind: dict[str, list[KubeObject]] = {kind.name: [] for kind in KINDS}
    for obj in objects:
        if _keep(obj, node_name):
            by_kind[KIND_OF[type(obj)].name].append(obj)
    for kind, items in by_kind.items():
        state.replace(kind, items)


@dataclass
class Diff:
    removed: list[tuple[str, ObjectKey]]
    changed: list[KubeObject]


def diff(old: Mapping[str, Mapping[ObjectKey, KubeObject]], new: Snapshot) -> Diff:
    removed: list[tuple[str, ObjectKey]] = []
    changed: list[KubeObject] = []
    for kind, objects in new.objects.items():
        before = old.get(kind, {})
        removed.extend((kind, key) for key in before if key not in objects)
        for key, obj in objects.items():
            previous = before.get(key)
            if previous is not obj and previous != obj:
                changed.append(obj)
    return Diff(removed, changed)


def _empty(path: str) -> ConfigError:
    return ConfigError(
        f"{path}: no objects (an empty file, only comments or only '---'): "
        "not a cluster, refusing it (a file being rewritten in place looks like this)"
    )


def _signature(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ClusterStateFile:
    """Loads the file once (fatal if bad or empty at start), then reloads it when it changes."""

    def __init__(self, path: str, state: ClusterState, *, node_name: str, poll_s: float) -> None:
        self.path = path
        self._state = state
        self._node = node_name
        self._poll_s = poll_s
        self._signature: tuple[int, int, int] | None = None
        self._applied: dict[str, dict[ObjectKey, KubeObject]] = {kind.name: {} for kind in KINDS}
        self._parsed: dict[bytes, _Parsed] = {}
        self._lock = asyncio.Lock()
        self.last_error: str | None = None
        self.reloads = 0
        self.reload_failures = 0
        """Reloads refused (unreadable, invalid or empty file); the previous state was kept."""
        state.register_source(SOURCE)

    def _read(self) -> Snapshot:
        snapshot = read_snapshot(self.path, node_name=self._node, previous=self._parsed)
        if snapshot.total == 0:
            raise _empty(self.path)
        return snapshot

    def load_initial(self) -> None:
        self._signature = _signature(self.path)
        snapshot = self._read()
        for kind, objects in snapshot.objects.items():
            self._state.replace(kind, objects.values())
        self._applied, self._parsed = snapshot.objects, snapshot.parsed
        # The state is long-lived: out of the cyclic collector's reach, a full collection does not
        # walk it (tens of milliseconds per 100k objects, holding the GIL, whichever thread runs it).
        gc.collect()
        gc.freeze()
        self._state.mark_synced(SOURCE)
        log.info(
            "loaded cluster state from %s (%d objects, %d of them for this node)",
            self.path,
            snapshot.total,
            snapshot.kept,
        )

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
        async with self._lock:
            applied = self._applied

            def work() -> tuple[Snapshot, Diff]:
                snapshot = self._read()
                return snapshot, diff(applied, snapshot)

            try:
                snapshot, changes = await asyncio.to_thread(work)
            except ConfigError as exc:
                self.last_error = str(exc)
                self.reload_failures += 1
                log.error("cluster state not reloaded, keeping the previous one: %s", exc)
                return False
            # Removals first: a pod address that moved is briefly nobody's (a request waits for
            # it) rather than two pods' (an ambiguity error).
            removed, changed = changes.removed, changes.changed
            for start in range(0, len(removed), APPLY_CHUNK):
                self._state.update(removed=removed[start : start + APPLY_CHUNK])
                await asyncio.sleep(0)
            for start in range(0, len(changed), APPLY_CHUNK):
                self._state.update(upserted=changed[start : start + APPLY_CHUNK])
                await asyncio.sleep(0)
            self._applied, self._parsed = snapshot.objects, snapshot.parsed
            self.last_error = None
            self.reloads += 1
            log.info(
                "reloaded cluster state from %s (%d objects, %d for this node; %d changed, %d removed)",
                self.path,
                snapshot.total,
                snapshot.kept,
                len(changed),
                len(removed),
            )
            return True
