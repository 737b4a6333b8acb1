"""kmock's Kubernetes emulator, completed with what kopf and kubectl rely on, served on a real port.

``kmock.KubernetesEmulator`` keeps objects in memory and serves list/watch/get/create/patch/delete,
but deliberately treats objects as plain JSON. Real clients need a little more of the API server's
bookkeeping; ``KubeEmulator`` adds exactly that (candidates for upstream):

- ``metadata.uid``, ``creationTimestamp`` and ``generation: 1`` on create; ``metadata.namespace`` from
  the URL; ``metadata.name`` from ``generateName`` plus a random suffix (kopf's Events use it);
- a cluster-wide ``resourceVersion`` counter, bumped on every write (create, patch, delete-marking),
  reported by list responses too; a watch from ``resourceVersion=N`` replays only newer objects;
- 422 (not 500) for a JSON patch that does not apply, e.g. a failed ``test`` of the resourceVersion;
- 409 for a merge patch carrying a ``metadata.resourceVersion`` other than the stored one (optimistic
  concurrency, as the webhook TLS Secret's renewal uses it);
- ``generation`` bumped when a patch changes ``spec`` (kopf and ``observedGeneration`` rely on it);
- ``kind``/``apiVersion`` on list responses (``PodList`` …), and ``labelSelector`` filtering (list, watch);
- ``Content-Type: application/json`` on watch streams; no event a new watcher already got in its
  initial events (kmock's bus replays its last event, possibly stale, to each new subscriber);
- the ``k8s.io/initial-events-end`` bookmark after the initial events when ``sendInitialEvents=true``;
- discovery entries of subresources (``llmroutes/status``) without the parent's short names;
- ``/api/v1/namespaces[/NAME]`` parsed as the Namespace resource (kmock reads ``namespaces`` there as
  the start of a namespaced path and fails; patched in ``kmock``'s path parser below).

``EmulatorThread`` runs it on a free loopback port in a background thread (its own event loop), so
synchronous tests, subprocesses (the operator, kubectl) and the test itself can all talk to it over
HTTP. ``write_kubeconfig`` points clients at it.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import re
import secrets
import threading
import uuid
import warnings
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import jsonpatch
import jsonpointer
import kmock
import yaml
from kmock._internal import dicts as kmock_dicts  # the emulator's own merge/JSON-patch semantics
from kmock._internal import parsing, rendering

from llmroute_operator.crd import custom_resource_definition

_parse_path = parsing.parse_path


def _parse_path_with_namespaces(path: str) -> parsing.ParsedPath:
    """kmock's path parser, plus the Namespace resource itself (``/api/v1/namespaces[/NAME]``)."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) in (3, 4):
        name = parts[3] if len(parts) == 4 else None
        return parsing.ParsedPath(group="", version="v1", plural="namespaces", name=name)
    return _parse_path(path)


parsing.parse_path = _parse_path_with_namespaces


def _timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    """Label selector strings: ``a=b``, ``a!=b``, ``a``, ``!a``, ``a in (x,y)``, ``a notin (x,y)``."""
    for term in (part.strip() for part in re.findall(r"(?:[^,(]|\([^)]*\))+", selector)):
        if match := re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", term):
            key, operator, values = match[1], match[2], {v.strip() for v in match[3].split(",")}
            if (operator == "in") != (key in labels and labels[key] in values):
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    """The emulator plus the API server's bookkeeping (see the module docstring)."""

    _revision: int = attrs.field(default=0, init=False)

    def _next_version(self) -> str:
        self._revision += 1
        return str(self._revision)

    def register_crd(self, crd: Mapping[str, Any]) -> None:
        """Serve a CustomResourceDefinition's resource in discovery."""
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            info = self.resources[f"{spec['group']}/{version['name']}/{names['plural']}"]
            info.kind = names["kind"]
            info.singular = names.get("singular")
            info.namespaced = spec["scope"] == "Namespaced"
            info.verbs = {"get", "list", "watch", "create", "update", "patch", "delete"}
            info.shortnames = set(names.get("shortNames", []))
            info.categories = set(names.get("categories", []))
            info.subresources = set(version.get("subresources", {}))

    async def _handle(self, request: Any) -> Any:
        if request.resource is not None and isinstance(request.data, dict | list):
            async with self._lock:
                self._bookkeep(request)
        return await super()._handle(request)

    def _bookkeep(self, request: Any) -> None:
        """Adjust the request body so that the stored object carries the server-set fields."""
        action = request.action
        if action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
            if request.namespace:
                meta["namespace"] = request.namespace
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _timestamp()
            meta["resourceVersion"] = self._next_version()
            meta["generation"] = 1
        elif action == kmock.action.UPDATE and request.name is not None:
            key = (request.resource, request.namespace, request.name)
            if key not in self.objects or self.objects[key].deleted:
                return
            old = copy.deepcopy(self.objects[key].raw)
            expected = (request.data.get("metadata") or {}) if isinstance(request.data, dict) else {}
            current = (old.get("metadata") or {}).get("resourceVersion")
            if expected.get("resourceVersion") not in (None, current):
                message = f"the object has been modified (resourceVersion {current})"
                raise kmock.KubernetesError(status=409, reason="Conflict", message=message)
            try:
                new = kmock_dicts.patch_dict(old, request.data)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as error:
                # The API server answers 422 when a JSON patch does not apply (kopf's resourceVersion
                # "test" op relies on that); kmock would answer 500.
                raise kmock.KubernetesError(status=422, reason="Invalid", message=str(error)) from None
            meta: dict[str, Any] = {"resourceVersion": self._next_version()}
            if request.subresource is None and new.get("spec") != old.get("spec"):
                meta["generation"] = int(old.get("metadata", {}).get("generation") or 1) + 1
            if isinstance(request.data, dict):
                request.data.setdefault("metadata", {}).update(meta)
            else:
                request.data.extend(
                    {"op": "add", "path": f"/metadata/{field}", "value": value}
                    for field, value in meta.items()
                )
        elif action == kmock.action.DELETE and request.name is not None:
            key = (request.resource, request.namespace, request.name)
            if key in self.objects and not self.objects[key].deleted:
                self.objects[key].last["metadata"]["resourceVersion"] = self._next_version()

    async def _serve_version(self, request: Any) -> Any:
        answer = await super()._serve_version(request)
        for entry in answer["resources"]:
            if "/" in entry["name"]:
                entry["shortNames"], entry["categories"] = [], []
        return answer

    async def _serve_list(self, request: Any) -> Any:
        answer = await super()._serve_list(request)
        info = self.resources[request.resource]
        group, version = request.resource.group, request.resource.version
        answer["apiVersion"] = f"{group}/{version}" if group else version
        answer["kind"] = f"{info.kind or request.resource.plural.capitalize()}List"
        answer["metadata"] = {"resourceVersion": str(self._revision)}
        selector = request.params.get("labelSelector")
        if selector:
            answer["items"] = [
                item
                for item in answer["items"]
                if _selector_matches(selector, item.get("metadata", {}).get("labels") or {})
            ]
        return answer

    def _serve_watch(self, request: Any) -> Any:
        return rendering.Response(headers={"Content-Type": "application/json"}, payload=self._watch(request))

    async def _watch(self, request: Any) -> AsyncIterator[Any]:
        """kmock's watch (existing objects as ADDED, then live events) with label filtering and the
        initial-events-end bookmark."""
        selector = request.params.get("labelSelector") or ""
        check = self._KubernetesEmulator__check  # the emulator's own namespace/name matching

        def wanted(obj: Mapping[str, Any]) -> bool:
            return _selector_matches(selector, (obj.get("metadata") or {}).get("labels") or {})

        yield b""  # send the headers now
        async with self._lock:
            objects = [
                obj.raw
                for obj in self._KubernetesEmulator__get_objs(request, strict=False)
                if not obj.deleted
            ]
            revision = self._revision
        since = int(request.params.get("resourceVersion") or 0)  # "0" or none: everything
        for raw in objects:
            if wanted(raw) and int(raw.get("metadata", {}).get("resourceVersion") or 0) > since:
                yield {"type": "ADDED", "object": raw}
        if request.params.get("sendInitialEvents") == "true":
            yield _initial_events_end(revision)
        async for event in self._buses[request.resource]:
            obj = event.get("object", {})
            meta = obj.get("metadata", {})
            if int(meta.get("resourceVersion") or 0) <= revision:
                continue  # already in the initial events (kmock's bus replays its last event to newcomers)
            if check(
                request, request.resource, meta.get("namespace"), meta.get("name"), strict=False
            ) and wanted(obj):
                yield event


def _initial_events_end(revision: int) -> dict[str, Any]:
    metadata = {"resourceVersion": str(revision), "annotations": {"k8s.io/initial-events-end": "true"}}
    return {"type": "BOOKMARK", "object": {"metadata": metadata}}


def kopf_peering_crds() -> list[dict[str, Any]]:
    """kopf's peering resources (``kopf.dev/v1`` KopfPeering, ClusterKopfPeering), as discovery needs them."""
    return [
        {
            "spec": {
                "group": "kopf.dev",
                "scope": scope,
                "names": {"kind": kind, "plural": kind.lower() + "s", "singular": kind.lower()},
                "versions": [{"name": "v1"}],
            }
        }
        for kind, scope in (("KopfPeering", "Namespaced"), ("ClusterKopfPeering", "Cluster"))
    ]


class EmulatorThread:
    """A ``KubeEmulator`` served on a free loopback port from a background thread."""

    def __init__(self) -> None:
        self.emulator = KubeEmulator()
        with warnings.catch_warnings():  # kmock reads its bundled file with a deprecated importlib call
            warnings.simplefilter("ignore", DeprecationWarning)
            self.emulator.resources.load_bundled()
        self.emulator.register_crd(custom_resource_definition())
        for crd in kopf_peering_crds():
            self.emulator.register_crd(crd)
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self._error: BaseException | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> EmulatorThread:
        self._thread.start()
        if not self._started.wait(10) or self._error is not None:
            raise RuntimeError(f"the Kubernetes emulator did not start: {self._error!r}")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as error:
            self._error = error
            self._started.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with self.emulator, kmock.Server(self.emulator) as server:
            self.port = server.port
            self._started.set()
            await self._stop.wait()

    def call(self, fn: Any) -> Any:
        """Run ``fn()`` on the emulator's loop (for reading its in-memory state safely)."""

        async def wrapper() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(10)

    def stop(self) -> None:
        if self._stop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def write_kubeconfig(path: Path, server: str, namespace: str = "default") -> Path:
    """A kubeconfig with one context pointing at ``server`` (no credentials: the emulator has none)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "emulator"}}],
        "contexts": [
            {"name": "emulator", "context": {"cluster": "emulator", "user": "tester", "namespace": namespace}}
        ],
        "current-context": "emulator",
    }
    path.write_text(yaml.safe_dump(config))
    return path
