"""An in-memory Kubernetes API server for tests, faithful where an operator depends on it.

kmock's `KubernetesEmulator` gives the HTTP plumbing, request parsing, discovery and the bundled
built-in resources. Every request for a known resource is served here instead, straight from a
plain store (no kmock reaction filters: their cost grows with the requests served), with what a
real kube-apiserver does and kmock does not: uid/resourceVersion/generation bookkeeping, the
status subresource, watches resumable from a resourceVersion, selectors, optimistic concurrency,
finalizers, and a log of requests by Kubernetes verb (to test RBAC against).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import copy
import dataclasses
import datetime
import functools
import gzip
import importlib.resources
import itertools
import json
import re
import secrets
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
from typing_extensions import override

Body = dict[str, Any]
ResourceKey = tuple[str, str, str]  # (group, version, plural); group '' is the core API
ObjectKey = tuple[str | None, str]  # (namespace, name)

# How often an idle watch looks whether its client has gone or the server is stopping.
_WATCH_POLL_SECONDS = 0.5


@dataclasses.dataclass(frozen=True)
class ApiRequest:
    """One request, as an RBAC rule sees it."""

    verb: str  # get, list, watch, create, update, patch, delete, deletecollection
    group: str
    version: str
    resource: str
    subresource: str | None
    namespace: str | None
    name: str | None
    user_agent: str = ""  # tells the operator's requests (kopf/..., kubetune-operator/...) from the tests'


@dataclasses.dataclass(frozen=True)
class WatchEvent:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    object: Body
    old: Body | None  # the previous state, to tell selector transitions apart


@dataclasses.dataclass
class _Journal:
    """The bounded history of one resource's changes, which watches replay and follow."""

    events: list[WatchEvent] = dataclasses.field(default_factory=list)
    offset: int = 0  # the absolute index of events[0]
    trimmed_rv: int = 0  # resuming from before this is answered 410 Gone
    wakeup: asyncio.Event | None = None


class ApiError(Exception):
    """Answered as a `Status` body, as the real API server does."""

    def __init__(self, code: int, reason: str, message: str, details: Body | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def as_status(self) -> Body:
        return {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "code": self.code,
            "reason": self.reason,
            "message": self.message,
            "details": self.details or {},
        }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (strategic merge patches are served the same: lists replaced)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


_SELECTOR_TERM = re.compile(
    r"\s*(?P<neg>!)?\s*(?P<key>[\w./-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[\w./-]*)|\s(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*(?:,|$)"
)


def parse_label_selector(selector: str) -> Callable[[dict[str, str]], bool]:
    """Parse `a=b,c!=d,e,!f,g in (x,y),h notin (z)` into a predicate on a labels dict."""
    checks: list[Callable[[dict[str, str]], bool]] = []
    pos = 0
    while pos < len(selector):
        match = _SELECTOR_TERM.match(selector, pos)
        if not match or match.end() == pos:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {selector[pos:]!r}")
        pos = match.end()
        key, value = match["key"], match["value"]
        if match["neg"]:
            checks.append(lambda labels, k=key: k not in labels)
        elif match["op"] in ("=", "=="):
            checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif match["op"] == "!=":
            checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif match["setop"]:
            values = {v.strip() for v in match["values"].split(",")}
            present = match["setop"] == "in"
            checks.append(lambda labels, k=key, vs=values, p=present: (labels.get(k) in vs) == p)
        else:
            checks.append(lambda labels, k=key: k in labels)
    return lambda labels: all(check(labels) for check in checks)


def parse_field_selector(selector: str) -> Callable[[Body], bool]:
    """Parse `metadata.name=x,status.phase!=Failed` into a predicate on an object."""
    checks: list[Callable[[Body], bool]] = []
    for term in filter(None, (t.strip() for t in selector.split(","))):
        match = re.fullmatch(r"([\w.]+)\s*(==|=|!=)\s*(.*)", term)
        if not match:
            raise ApiError(400, "BadRequest", f"invalid field selector: {term!r}")
        path, op, value = match.groups()

        def field(obj: Body, path: str = path) -> str:
            for part in path.split("."):
                obj = obj.get(part) if isinstance(obj, dict) else None
            return "" if obj is None else str(obj)

        equal = op != "!="
        checks.append(lambda obj, f=field, v=value, eq=equal: (f(obj) == v) == eq)
    return lambda obj: all(check(obj) for check in checks)


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """A stateful Kubernetes API for tests; see the module docstring for what it adds to kmock."""

    history_limit: int = 10_000  # watch events kept per resource for resuming
    api_requests: list[ApiRequest] = attrs.field(factory=list, init=False)  # kmock owns `.requests`
    _store: dict[ResourceKey, dict[ObjectKey, Body]] = attrs.field(
        factory=lambda: collections.defaultdict(dict), init=False
    )
    _journals: dict[ResourceKey, _Journal] = attrs.field(factory=lambda: collections.defaultdict(_Journal), init=False)
    _counter: Iterator[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _rv: int = attrs.field(default=0, init=False)
    _closing: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # As kmock's `resources.load_bundled()`, less its deprecated `importlib.resources.read_binary`.
        self.resources.load_data(_bundled_resources())

    # -- public helpers for tests ----------------------------------------------------------------

    def register_crd(self, crd: Body) -> Body:
        """Serve the custom resource a CRD manifest declares, and the CRD itself."""
        return self._commit_create(("apiextensions.k8s.io", "v1", "customresourcedefinitions"), None, crd)

    def get_object(self, resource: ResourceKey, namespace: str | None, name: str) -> Body | None:
        return self._store[resource].get((namespace, name))

    def list_objects(self, resource: ResourceKey, namespace: str | None = None) -> list[Body]:
        # A snapshot first: tests may read from their own thread while the server writes.
        objects = list(self._store[resource].items())
        return [obj for (ns, _), obj in objects if namespace in (None, ns)]

    def history(self, resource: ResourceKey, namespace: str | None, name: str) -> list[WatchEvent]:
        """The retained watch events of one object, oldest first (for assertions on transitions)."""
        return [
            event
            for event in self._journals[resource].events
            if (event.object["metadata"].get("namespace"), event.object["metadata"]["name"]) == (namespace, name)
        ]

    def verbs_by_resource(self) -> dict[tuple[str, str], set[str]]:
        """The verbs used, keyed as RBAC rules name resources: (apiGroup, "resource[/subresource]").

        E.g. `{("batch", "jobs"): {"create", "get"}, ("", "pods/status"): {"patch"}}`.
        """
        verbs: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
        for req in self.api_requests:
            name = f"{req.resource}/{req.subresource}" if req.subresource else req.resource
            verbs[req.group, name].add(req.verb)
        return dict(verbs)

    def collect_garbage(self) -> list[Body]:
        """Delete what the garbage collector would: objects all of whose owners are gone, repeatedly
        (a Job's pods, then what the pods own). Returns them as deleted or marked for deletion.

        Call it on the server's event loop (`KubeApiServer.collect_garbage` does).
        """
        collected: list[Body] = []
        while True:
            uids = {obj["metadata"]["uid"] for objects in self._store.values() for obj in objects.values()}
            orphans = [
                (resource, obj)
                for resource, objects in self._store.items()
                for obj in objects.values()
                if obj["metadata"].get("ownerReferences")
                and not obj["metadata"].get("deletionTimestamp")
                and not any(owner.get("uid") in uids for owner in obj["metadata"]["ownerReferences"])
            ]
            if not orphans:
                return collected
            collected += [self._delete(resource, obj) for resource, obj in orphans]

    def close_watches(self) -> None:
        self._closing = True
        for journal in self._journals.values():
            if journal.wakeup is not None:
                journal.wakeup.set()

    # -- dispatch --------------------------------------------------------------------------------

    @override
    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw_request.path.rstrip("/") != "/api/v1/namespaces":
            return await super().__call__(raw_request)
        # kmock's URL parser fails on this one path (it takes `namespaces` for a namespace prefix).
        body = await raw_request.read()
        return await self._handle(
            kmock.Request(
                method=raw_request.method,
                url=raw_request.url,
                params=dict(raw_request.query),
                headers=dict(raw_request.headers),
                body=body,
                data=json.loads(body) if body else None,
                resource=kmock.resource("", "v1", "namespaces"),
                raw_request=raw_request,
            )
        )

    @override
    async def _serve_version(self, request: kmock.Request) -> kmock.Payload:
        resources = await super()._serve_version(request)
        assert isinstance(resources, dict)
        resources["groupVersion"] = resources["groupVersion"].lstrip("/")  # the core API's is `v1`
        return resources

    @override
    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        res = request.resource
        if res is None or res.plural is None:
            return await self._serve_discovery(request)
        key: ResourceKey = (res.group or "", res.version or "", res.plural)
        verb = self._verb(request)
        self.api_requests.append(
            ApiRequest(
                verb,
                key[0],
                key[1],
                key[2],
                request.subresource,
                request.namespace,
                request.name,
                request.headers.get("User-Agent", ""),
            )
        )
        try:
            self._info(key)
            if verb == "watch":
                return await self._serve_watch_stream(request, key)
            handler = {
                "get": self._serve_get,
                "list": self._serve_list_objects,
                "create": self._serve_post,
                "update": self._serve_put,
                "patch": self._serve_patch,
                "delete": self._serve_del,
                "deletecollection": self._serve_delete_collection,
            }[verb]
            status, body = handler(request, key)
        except ApiError as e:
            status, body = e.code, e.as_status()
        return aiohttp.web.json_response(body, status=status)

    async def _serve_discovery(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """kmock's discovery answers, called directly: through its reactions they slow down."""
        parts = tuple(request.url.path.strip("/").split("/"))
        serve = {
            ("",): self._serve_root,
            ("version",): self._serve_server_version,
            ("api",): self._serve_api,
            ("apis",): self._serve_apis,
        }.get(parts)
        if serve is None and len(parts) in (2, 3) and parts[0] in ("api", "apis"):
            serve = self._serve_group if parts[0] == "apis" and len(parts) == 2 else self._serve_version
        if serve is None:  # not Kubernetes: whatever reactions a test has declared
            return await super()._handle(request)
        try:
            return aiohttp.web.json_response(await serve(request))
        except kmock.KubernetesError as e:
            error = ApiError(e.status, e.reason or "NotFound", e.message or "")
            return aiohttp.web.json_response(error.as_status(), status=e.status)

    @staticmethod
    def _verb(request: kmock.Request) -> str:
        method = request.method.value.upper()
        if method == "GET":
            return "watch" if request.params.get("watch") in ("true", "1") else ("get" if request.name else "list")
        if method == "DELETE":
            return "delete" if request.name else "deletecollection"
        return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())

    # -- reading ---------------------------------------------------------------------------------

    def _serve_get(self, request: kmock.Request, key: ResourceKey) -> tuple[int, Body]:
        return 200, self._existing(key, request.namespace, request.name)

    def _serve_list_objects(self, request: kmock.Request, key: ResourceKey) -> tuple[int, Body]:
        matches = self._matcher(request)
        info = self._info(key)
        return 200, {
            "apiVersion": self._api_version(key),
            "kind": f"{info.kind}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": [obj for obj in self._objects_of(key, request.namespace) if matches(obj)],
        }

    def _objects_of(self, key: ResourceKey, namespace: str | None) -> list[Body]:
        objects = self.list_objects(key, namespace)
        if key == ("", "v1", "namespaces"):  # namespaces that are only used exist too, as `default`
            used = {ns for objs in self._store.values() for ns, _ in objs} | {"default"}
            stored = {obj["metadata"]["name"] for obj in objects}
            objects += [self._implicit_namespace(ns) for ns in sorted(used - stored - {None})]
        return objects

    def _implicit_namespace(self, name: str) -> Body:
        return {
            "apiVersion": "v1",
            "kind": "Namespace",
            "status": {"phase": "Active"},
            "metadata": {
                "name": name,
                "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
                "resourceVersion": "1",
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {"kubernetes.io/metadata.name": name},
            },
        }

    @staticmethod
    def _matcher(request: kmock.Request) -> Callable[[Body], bool]:
        labels = parse_label_selector(request.params.get("labelSelector", ""))
        fields = parse_field_selector(request.params.get("fieldSelector", ""))
        name = request.name
        return lambda obj: (
            (name is None or obj["metadata"]["name"] == name)
            and labels(obj["metadata"].get("labels") or {})
            and fields(obj)
        )

    async def _serve_watch_stream(
        self,
        request: kmock.Request,
        key: ResourceKey,
    ) -> aiohttp.web.StreamResponse:
        matches = self._matcher(request)
        namespace = request.namespace
        timeout = float(request.params.get("timeoutSeconds") or 0)
        deadline = asyncio.get_running_loop().time() + timeout if timeout else None
        journal = self._journals[key]
        since = request.params.get("resourceVersion") or "0"

        raw_request = request._raw_request
        assert raw_request is not None
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw_request)

        async def send(event_type: str, obj: Body) -> None:
            await response.write(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")

        try:
            if since == "0":  # "any version": the current state first, then what follows it
                for obj in self._objects_of(key, namespace):
                    if matches(obj):
                        await send("ADDED", obj)
                position = journal.offset + len(journal.events)
            elif int(since) < journal.trimmed_rv:
                raise ApiError(410, "Expired", f"too old resource version: {since}")
            else:
                rvs = [event.rv for event in journal.events]
                position = journal.offset + bisect.bisect_right(rvs, int(since))

            while not self._closing:
                if position < journal.offset:
                    raise ApiError(410, "Expired", "too old resource version: the watch fell behind")
                if journal.wakeup is None or journal.wakeup.is_set():
                    journal.wakeup = asyncio.Event()
                wakeup = journal.wakeup
                for event in journal.events[position - journal.offset :]:
                    position += 1
                    if namespace in (None, event.object["metadata"].get("namespace")):
                        event_type = self._visible_type(event, matches)
                        if event_type:
                            await send(event_type, event.object)
                if position < journal.offset + len(journal.events):
                    continue  # more arrived while sending
                remaining = deadline - asyncio.get_running_loop().time() if deadline else None
                if remaining is not None and remaining <= 0:
                    break
                transport = raw_request.transport
                if transport is None or transport.is_closing():
                    break
                wait = min(_WATCH_POLL_SECONDS, remaining) if remaining else _WATCH_POLL_SECONDS
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), wait)
        except ApiError as e:
            await send("ERROR", e.as_status())
        except ConnectionResetError:  # aiohttp's ClientConnectionResetError too
            return response  # the client has gone
        await response.write_eof()
        return response

    @staticmethod
    def _visible_type(event: WatchEvent, matches: Callable[[Body], bool]) -> str | None:
        """A selector-filtered watch sees objects enter and leave the selection as ADDED/DELETED."""
        now = matches(event.object)
        if event.type != "MODIFIED":
            return event.type if now else None
        before = event.old is not None and matches(event.old)
        return "MODIFIED" if now and before else "ADDED" if now else "DELETED" if before else None

    # -- writing ---------------------------------------------------------------------------------

    def _serve_post(self, request: kmock.Request, key: ResourceKey) -> tuple[int, Body]:
        if request.subresource:
            raise ApiError(405, "MethodNotAllowed", f"create is not supported on {request.subresource}")
        return 201, self._commit_create(key, request.namespace, self._body_of(request))

    def _serve_put(self, request: kmock.Request, key: ResourceKey) -> tuple[int, Body]:
        old = self._existing(key, request.namespace, request.name)
        body = self._body_of(request)
        if body.get("metadata", {}).get("name", request.name) != request.name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name in the URL")
        return 200, self._commit_update(key, old, body, request.subresource)

    def _serve_patch(self, request: kmock.Request, key: ResourceKey) -> tuple[int, Body]:
        old = self._existing(key, request.namespace, request.name)
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type == "application/json-patch+json":
            try:
                patched = jsonpatch.apply_patch(old, request.data)
            except jsonpatch.JsonPatchTestFailed as e:
                raise ApiError(422, "Invalid", f"the server rejected our request due to an error: {e}") from e
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise ApiError(422, "Invalid", f"the JSON patch could not be applied: {e}") from e
        elif content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            patched = merge_patch(old, self._body_of(request))
        else:
            raise ApiError(415, "UnsupportedMediaType", f"the patch type {content_type!r} is not supported")
        return 200, self._commit_update(key, old, patched, request.subresource)

    def _serve_del(self, request: kmock.Request, key: ResourceKey) -> tuple[int, Body]:
        return 200, self._delete(key, self._existing(key, request.namespace, request.name))

    def _serve_delete_collection(self, request: kmock.Request, key: ResourceKey) -> tuple[int, Body]:
        matches = self._matcher(request)
        deleted = [self._delete(key, obj) for obj in self.list_objects(key, request.namespace) if matches(obj)]
        info = self._info(key)
        return 200, {
            "apiVersion": self._api_version(key),
            "kind": f"{info.kind}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": deleted,
        }

    def _commit_create(self, key: ResourceKey, namespace: str | None, body: Body) -> Body:
        info = self._info(key)
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if info.namespaced:
            if namespace and meta.get("namespace", namespace) != namespace:
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            meta["namespace"] = namespace or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if not meta.get("name"):
            raise ApiError(422, "Invalid", f"{info.kind}: metadata.name: Required value: name is required")
        if (meta.get("namespace"), meta["name"]) in self._store[key]:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{self._qualified(key)} "{meta["name"]}" already exists',
                self._details(key, meta["name"]),
            )
        if "status" in info.subresources:
            obj.pop("status", None)  # the status of a new object is the controllers' to write
        if key == ("", "v1", "pods"):
            obj["status"] = {"phase": "Pending"}  # as the API server defaults it, before any scheduling
        obj["apiVersion"], obj["kind"] = self._api_version(key), info.kind
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
            meta.pop(field, None)
        if key == ("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            self._serve_custom_resource(obj)
        return self._commit(key, "ADDED", obj, None)

    def _commit_update(self, key: ResourceKey, old: Body, body: Body, subresource: str | None) -> Body:
        info = self._info(key)
        claimed_rv = (body.get("metadata") or {}).get("resourceVersion")
        if claimed_rv and claimed_rv != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f"Operation cannot be fulfilled on {self._qualified(key)} "
                f'"{old["metadata"]["name"]}": the object has been modified; '
                "please apply your changes to the latest version and try again",
                self._details(key, old["metadata"]["name"]),
            )
        if subresource == "status":
            new = copy.deepcopy(old)
            if body.get("status") is None:
                new.pop("status", None)
            else:
                new["status"] = copy.deepcopy(body["status"])
        elif subresource:
            raise ApiError(404, "NotFound", f"the subresource {subresource!r} is not served here")
        else:
            new = copy.deepcopy(body)
            new["metadata"] = dict(new.get("metadata") or {})
            if "status" in info.subresources:
                new.pop("status", None)
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
        # What the server owns, a client cannot change.
        for field in (
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "generation",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "resourceVersion",
        ):
            if field in old["metadata"]:
                new["metadata"][field] = old["metadata"][field]
            else:
                new["metadata"].pop(field, None)
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        if new == old:
            return old  # a no-op write changes no resourceVersion and notifies no watch
        if _spec_of(new) != _spec_of(old):
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            return self._commit(key, "DELETED", new, old)
        return self._commit(key, "MODIFIED", new, old)

    def _delete(self, key: ResourceKey, obj: Body) -> Body:
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            return obj
        if meta.get("finalizers"):
            new = copy.deepcopy(obj)
            new["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
            return self._commit(key, "MODIFIED", new, obj)
        return self._commit(key, "DELETED", copy.deepcopy(obj), obj)

    def _commit(self, key: ResourceKey, event_type: str, obj: Body, old: Body | None) -> Body:
        self._rv = next(self._counter)
        obj["metadata"]["resourceVersion"] = str(self._rv)
        object_key = (obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if event_type == "DELETED":
            del self._store[key][object_key]
        else:
            self._store[key][object_key] = obj
        journal = self._journals[key]
        journal.events.append(WatchEvent(self._rv, event_type, obj, old))
        if len(journal.events) > 2 * self.history_limit:
            dropped = len(journal.events) - self.history_limit
            journal.trimmed_rv = journal.events[dropped - 1].rv
            journal.offset += dropped
            del journal.events[:dropped]
        if journal.wakeup is not None:
            journal.wakeup.set()
        return obj

    def _serve_custom_resource(self, crd: Body) -> None:
        spec, names = crd["spec"], crd["spec"]["names"]
        for version in spec["versions"]:
            self.resources[spec["group"], version["name"], names["plural"]] = kmock.ResourceInfo(
                kind=names["kind"],
                singular=names.get("singular", names["kind"].lower()),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                shortnames=names.get("shortNames", []),
                categories=names.get("categories", []),
                subresources=version.get("subresources", {}).keys(),
                verbs=["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"],
            )
        crd["status"] = {
            "acceptedNames": names,
            "storedVersions": [v["name"] for v in spec["versions"] if v.get("storage")],
            "conditions": [
                {"type": t, "status": "True", "reason": r, "lastTransitionTime": _now()}
                for t, r in (("NamesAccepted", "NoConflicts"), ("Established", "InitialNamesAccepted"))
            ],
        }

    # -- small things ----------------------------------------------------------------------------

    def _info(self, key: ResourceKey) -> kmock.ResourceInfo:
        resource = kmock.resource(*key)
        if resource not in self.resources:  # kmock's `resources[...]` would add it
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return self.resources[resource]

    def _existing(self, key: ResourceKey, namespace: str | None, name: str | None) -> Body:
        if not self._info(key).namespaced:
            namespace = None
        obj = self._store[key].get((namespace, name or ""))
        if obj is None and key == ("", "v1", "namespaces"):
            obj = next((ns for ns in self._objects_of(key, None) if ns["metadata"]["name"] == name), None)
        if obj is None:
            raise ApiError(404, "NotFound", f'{self._qualified(key)} "{name}" not found', self._details(key, name))
        return obj

    @staticmethod
    def _body_of(request: kmock.Request) -> Body:
        if not isinstance(request.data, dict):
            raise ApiError(400, "BadRequest", "the request body is not a JSON object")
        return request.data

    @staticmethod
    def _api_version(key: ResourceKey) -> str:
        return f"{key[0]}/{key[1]}" if key[0] else key[1]

    @staticmethod
    def _qualified(key: ResourceKey) -> str:
        return f"{key[2]}.{key[0]}" if key[0] else key[2]

    def _details(self, key: ResourceKey, name: str | None) -> Body:
        return {"name": name, "group": key[0], "kind": key[2]}


@functools.cache
def _bundled_resources() -> bytes:
    """kmock's built-in resources (batch/v1 jobs, v1 pods, events, CRDs...), from a recent K3s."""
    bundled = importlib.resources.files("kmock._internal").joinpath("resources.json.gz")
    return gzip.decompress(bundled.read_bytes())


def _spec_of(obj: Body) -> Body:
    """What `metadata.generation` counts changes of: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}
