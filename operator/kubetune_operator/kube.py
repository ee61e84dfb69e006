"""The Kubernetes API, as the operator uses it: the only module that talks to the API server.

One client is made at startup (kept in Kopf's `memo`) and closed at cleanup. Calls go through the official
client's connection pool in worker threads (`asyncio.to_thread`) and return plain dicts exactly as the API
serves them (camelCase), so the pure layers never see client models. Events are posted in the background,
each on its own (`Kube.event`), so none waits for another.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import kubernetes
import urllib3

from kubetune_operator import API_GROUP, API_VERSION, KIND, PLURAL, SWEEP_PLURAL
from kubetune_operator.cache import Body
from kubetune_operator.settings import API_CONCURRENCY

MERGE_PATCH = "application/merge-patch+json"
USER_AGENT = "kubetune-operator"  # audit logs (and the tests' RBAC check) tell the operator's calls by it
COMPONENT = "kubetune-operator"  # an Event's source (`kubectl describe`'s From column)
EVENT_MESSAGE_MAX = 1024
EVENT_RETRY_SECONDS = (1.0, 2.0, 4.0)  # an Event the API server could not take is tried again after these
NAMESPACE_TERMINATING = "because it is being terminated"

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """A failed API call: its HTTP status and the API server's Status message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class ApiUnreachable(Exception):
    """The API server did not answer (refused the connection, timed out): nothing is known of the call's fate."""


class NameConflict(Exception):
    """A child's name is taken by an object this FineTuneJob does not own; it is never overwritten."""


class OwnedByPredecessor(Exception):
    """A child's name is held by a deleted FineTuneJob of the same name; the garbage collector frees it."""


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the REST API."""

    group: str
    version: str
    plural: str

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        prefix = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        path = f"{prefix}/namespaces/{quote(namespace)}/{self.plural}"
        if name is not None:
            path += f"/{quote(name)}"
        if subresource is not None:
            path += f"/{subresource}"
        return path

    @property
    def gvr(self) -> tuple[str, str, str]:
        """(group, version, plural), as Kopf's handler decorators take them."""
        return self.group, self.version, self.plural


FINETUNEJOBS = Resource(API_GROUP, API_VERSION, PLURAL)
FINETUNESWEEPS = Resource(API_GROUP, API_VERSION, SWEEP_PLURAL)
JOBS = Resource("batch", "v1", "jobs")
CONFIGMAPS = Resource("", "v1", "configmaps")
PODS = Resource("", "v1", "pods")
SERVICES = Resource("", "v1", "services")
EVENTS = Resource("", "v1", "events")
KUEUE_GROUP = "kueue.x-k8s.io"


def resource_of(body: Body, plural: str) -> Resource:
    """Where `body` (an object as served, with its apiVersion) lives: for kinds whose served version varies,
    such as Kueue's Workload (v1beta1 before Kueue 0.15, v1beta2 since)."""
    group, _, version = str(body.get("apiVersion", "")).rpartition("/")
    return Resource(group, version, plural)


KIND_RESOURCES = {"Job": JOBS, "ConfigMap": CONFIGMAPS, "Service": SERVICES, KIND: FINETUNEJOBS}


def owned_by(obj: Body, owner_uid: str) -> bool:
    return any(ref.get("uid") == owner_uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


def owner_name(obj: Body) -> str | None:
    """The FineTuneJob controlling `obj`, from its ownerReferences."""
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{API_GROUP}/"):
            return str(ref["name"])
    return None


def check_owner(obj: Body, owner: Body) -> None:
    """Raise unless `owner` controls `obj`: OwnedByPredecessor for a same-named FineTuneJob's leftovers (wait
    for the garbage collector), NameConflict for anything else (never overwritten)."""
    if owned_by(obj, owner["metadata"]["uid"]):
        return
    kind, name = obj.get("kind", "object"), obj["metadata"]["name"]
    if owner_name(obj) == owner["metadata"]["name"]:
        raise OwnedByPredecessor(f"{kind} {name} still belongs to a deleted FineTuneJob of the same name")
    raise NameConflict(
        f"{kind} {name} already exists and is not owned by this FineTuneJob; delete it or rename the FineTuneJob"
    )


class Kube:
    """Async access to the few API calls the operator makes (all within the Helm chart's RBAC)."""

    def __init__(self, api_client: kubernetes.client.ApiClient, concurrency: int = API_CONCURRENCY) -> None:
        self._client = api_client
        # The client blocks; its calls run in threads of their own, as many as its connection pool holds.
        self._client.configuration.connection_pool_maxsize = concurrency
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="kubetune-api")
        self._closed = False
        self._events: set[asyncio.Task[None]] = set()

    @classmethod
    def connect(cls, concurrency: int = API_CONCURRENCY) -> Kube:
        """In the cluster: the pod's service account; outside: the current kubeconfig context."""
        configuration = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(client_configuration=configuration)
        # The pool is sized when the ApiClient is made (later changes are ignored): one connection per thread.
        configuration.connection_pool_maxsize = concurrency
        api_client = kubernetes.client.ApiClient(configuration)
        api_client.user_agent = USER_AGENT
        return cls(api_client, concurrency)

    def close(self) -> None:
        """Refuse new calls; let calls in flight finish (Kopf may stop daemons after its cleanup). Events not yet
        posted are dropped."""
        self._closed = True
        for task in self._events:
            task.cancel()
        self._executor.shutdown(wait=False)

    def _request_sync(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Body:
        params = self._client.param_serialize(
            method=method,
            resource_path=path,
            query_params=[],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self._client.call_api(*params, _request_timeout=30)
            data = response.read()
        except urllib3.exceptions.HTTPError as error:
            raise ApiUnreachable(f"{method} {path}: {error}") from None
        except kubernetes.client.ApiException as error:
            if error.status:
                raise
            raise ApiUnreachable(f"{method} {path}: {error.reason}") from None  # a TLS failure
        parsed = json.loads(data) if data else {}
        if not 200 <= response.status < 300:
            message = parsed.get("message") if isinstance(parsed, dict) else None
            raise ApiError(response.status, str(message or response.reason))
        return parsed

    async def _request(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Body:
        if self._closed:
            raise ApiError(503, "the operator is stopping")
        call = functools.partial(self._request_sync, method, path, body, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def get(self, resource: Resource, namespace: str, name: str) -> Body | None:
        try:
            return await self._request("GET", resource.path(namespace, name))
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    async def create(self, obj: Body) -> Body:
        resource = KIND_RESOURCES[obj["kind"]]
        return await self._request("POST", resource.path(obj["metadata"]["namespace"]), obj)

    async def ensure(self, obj: Body, owner: Body) -> tuple[Body, bool]:
        """The child `obj` as it exists, created if missing: (object, whether it was created now).

        A same-named object is adopted only if the owner controls it; one owned by nobody or by someone
        else raises NameConflict (never overwritten).
        """
        resource = KIND_RESOURCES[obj["kind"]]
        namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        try:  # create first: a new FineTuneJob's children do not exist, so this is one call, not two
            return await self.create(obj), True
        except ApiError as error:
            if error.status != 409:
                raise
        existing = await self.get(resource, namespace, name)
        if existing is None:  # deleted between the two calls: the next sync creates it
            raise ApiError(409, f"{obj['kind']} {name} is being deleted")
        check_owner(existing, owner)
        return existing, False

    async def patch(
        self, resource: Resource, namespace: str, name: str, patch: Body, subresource: str | None = None
    ) -> Body:
        return await self._request(
            "PATCH", resource.path(namespace, name, subresource), patch, content_type=MERGE_PATCH
        )

    async def patch_status(self, namespace: str, name: str, status: Body) -> Body:
        return await self.patch(FINETUNEJOBS, namespace, name, {"status": status}, subresource="status")

    async def delete(self, resource: Resource, namespace: str, name: str) -> None:
        try:
            await self._request("DELETE", resource.path(namespace, name), {"propagationPolicy": "Background"})
        except ApiError as error:
            if error.status != 404:
                raise

    def event(self, obj: Body, type: str, reason: str, message: str) -> None:
        """A Kubernetes Event on `obj` (what `kubectl describe` lists), posted in the background: it never holds up
        a sync or another Event. Events are best effort, in Kubernetes as here: one is dropped at once when its
        namespace is being deleted or gone, and after EVENT_RETRY_SECONDS when the API server keeps refusing it.
        (Kopf's poster posts one Event at a time, retrying each for about a minute: a deleted namespace's Events
        held back every other namespace's.)"""
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._post_event(event_body(obj, type, reason, message)))
        self._events.add(task)
        task.add_done_callback(self._events.discard)

    async def _post_event(self, body: Body) -> None:
        namespace = body["metadata"]["namespace"]
        for delay in (*EVENT_RETRY_SECONDS, None):
            try:
                await self._request("POST", EVENTS.path(namespace), body)
                return
            except ApiError as error:
                if error.status == 404 or NAMESPACE_TERMINATING in error.message or self._closed:
                    return  # the namespace goes, and its Events with it
                if error.status < 500 and error.status != 429:
                    logger.warning("event %s on %s/%s refused: %s", body["reason"], namespace,
                                   body["involvedObject"]["name"], error)  # fmt: skip
                    return
                problem: Exception = error
            except ApiUnreachable as error:
                problem = error
            if delay is None:
                logger.warning("event %s on %s/%s dropped: %s", body["reason"], namespace,
                               body["involvedObject"]["name"], problem)  # fmt: skip
                return
            await asyncio.sleep(delay)


def event_body(obj: Body, type: str, reason: str, message: str) -> Body:
    """A core/v1 Event about `obj`, as `kubectl describe` shows it."""
    meta = obj["metadata"]
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if len(message) > EVENT_MESSAGE_MAX:
        message = message[: EVENT_MESSAGE_MAX - 3] + "..."
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"namespace": meta["namespace"], "generateName": f"{meta['name']}."},
        "involvedObject": {
            "apiVersion": obj.get("apiVersion"),
            "kind": obj.get("kind"),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "type": type,
        "reason": reason,
        "message": message,
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": os.environ.get("HOSTNAME", COMPONENT),
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
