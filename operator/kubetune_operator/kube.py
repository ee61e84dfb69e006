"""The Kubernetes API, as the operator uses it: the only module that talks to the API server.

One client is made at startup (kept in Kopf's `memo`) and closed at cleanup. Calls go through the official
client's connection pool in worker threads (`asyncio.to_thread`) and return plain dicts exactly as the API
serves them (camelCase), so the pure layers never see client models. Events are posted through Kopf's
own queue (batched, with Kopf's credentials).
"""

from __future__ import annotations

import asyncio
import functools
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import kopf
import kubernetes
import urllib3

from kubetune_operator import API_GROUP, API_VERSION, KIND, PLURAL, SWEEP_PLURAL
from kubetune_operator.cache import Body
from kubetune_operator.settings import API_CONCURRENCY

MERGE_PATCH = "application/merge-patch+json"
USER_AGENT = "kubetune-operator"  # audit logs (and the tests' RBAC check) tell the operator's calls by it


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
        """Refuse new calls; let calls in flight finish (Kopf may stop daemons after its cleanup)."""
        self._closed = True
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

    @staticmethod
    def event(obj: Body, type: str, reason: str, message: str) -> None:
        """A Kubernetes Event on `obj` (what `kubectl describe` lists), queued to Kopf's poster."""
        kopf.event(obj, type=type, reason=reason, message=message)
