"""The emulator against the official `kubernetes` client and against Kopf: what an operator needs."""

from __future__ import annotations

import pathlib
import textwrap
import time
from collections.abc import Callable

import kopf.testing
import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from tests.kubeapi import cluster
from tests.kubeapi.server import KubeApiServer

GROUP, VERSION, PLURAL = "kubetune.dev", "v1alpha1", "finetunejobs"
FTJ = (GROUP, VERSION, PLURAL)
JOB = {
    "metadata": {"name": "j"},
    "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}},
}


def finetunejob(name: str, **spec: object) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {"model": "tiny", **spec},
    }


@pytest.fixture
def custom(kube_api: KubeApiServer) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi()


@pytest.fixture
def core(kube_api: KubeApiServer) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api()


def create_ftj(custom: kubernetes.client.CustomObjectsApi, name: str, **spec: object) -> dict:
    return custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, finetunejob(name, **spec))


def test_create_returns_the_object_with_server_fields(core: kubernetes.client.CoreV1Api) -> None:
    pod = core.create_namespaced_pod("ns1", {"metadata": {"name": "p"}, "spec": {"containers": []}})
    assert pod.metadata.name == "p" and pod.metadata.namespace == "ns1"
    assert pod.metadata.uid and pod.metadata.creation_timestamp
    assert int(pod.metadata.resource_version) > 0 and pod.metadata.generation == 1
    other = core.create_namespaced_pod("ns1", {"metadata": {"name": "q"}, "spec": {"containers": []}})
    assert int(other.metadata.resource_version) > int(pod.metadata.resource_version)


def test_duplicate_create_is_409_already_exists(custom: kubernetes.client.CustomObjectsApi) -> None:
    create_ftj(custom, "a")
    with pytest.raises(ApiException) as e:
        create_ftj(custom, "a")
    assert e.value.status == 409 and '"reason":"AlreadyExists"' in e.value.body.replace(" ", "")


def test_generation_bumps_on_spec_changes_only(custom: kubernetes.client.CustomObjectsApi) -> None:
    create_ftj(custom, "a")
    obj = custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "a", {"metadata": {"labels": {"x": "y"}}}
    )
    assert obj["metadata"]["generation"] == 1
    obj = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "a", {"status": {"phase": "Running"}}
    )
    assert obj["metadata"]["generation"] == 1
    obj = custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a", {"spec": {"model": "bigger"}})
    assert obj["metadata"]["generation"] == 2


def test_status_subresource_is_kept_apart(custom: kubernetes.client.CustomObjectsApi) -> None:
    create_ftj(custom, "a")
    obj = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "a", {"status": {"phase": "Running"}, "spec": {"model": "x"}}
    )
    assert obj["status"] == {"phase": "Running"} and obj["spec"]["model"] == "tiny"
    obj = custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "a", {"status": {"phase": "Hacked"}, "spec": {"model": "y"}}
    )
    assert obj["status"] == {"phase": "Running"} and obj["spec"]["model"] == "y"


def test_builtin_job_status_is_a_subresource(kube_api: KubeApiServer) -> None:
    batch = kubernetes.client.BatchV1Api()
    job = batch.create_namespaced_job(
        "default",
        {
            "metadata": {"name": "j"},
            "status": {"active": 5},
            "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}},
        },
    )
    assert job.status is None or job.status.active is None
    batch.patch_namespaced_job("j", "default", {"status": {"active": 3}})
    assert batch.read_namespaced_job("j", "default").status is None


def test_put_replaces_and_stale_resource_version_conflicts(
    custom: kubernetes.client.CustomObjectsApi,
) -> None:
    obj = create_ftj(custom, "a")
    obj["spec"] = {"model": "replaced"}
    new = custom.replace_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a", obj)
    assert new["spec"] == {"model": "replaced"} and new["metadata"]["generation"] == 2
    with pytest.raises(ApiException) as e:  # `obj` still carries the old resourceVersion
        custom.replace_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a", obj)
    assert e.value.status == 409
    stale = {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]}, "spec": {"model": "z"}}
    with pytest.raises(ApiException) as e:
        custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a", stale)
    assert e.value.status == 409


def test_failed_json_patch_test_is_422(custom: kubernetes.client.CustomObjectsApi) -> None:
    create_ftj(custom, "a")
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "0"},
        {"op": "replace", "path": "/spec/model", "value": "x"},
    ]
    with pytest.raises(ApiException) as e:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, "default", PLURAL, "a", ops, _content_type="application/json-patch+json"
        )
    assert e.value.status == 422
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a")
    assert obj["spec"]["model"] == "tiny"


def test_watch_from_a_resource_version_loses_nothing(custom: kubernetes.client.CustomObjectsApi) -> None:
    since = create_ftj(custom, "a")["metadata"]["resourceVersion"]
    for model in ("one", "two", "three"):
        custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a", {"spec": {"model": model}})
    events = list(
        kubernetes.watch.Watch().stream(
            custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            "default",
            PLURAL,
            resource_version=since,
            timeout_seconds=1,
        )
    )
    assert [(e["type"], e["object"]["spec"]["model"]) for e in events] == [
        ("MODIFIED", "one"),
        ("MODIFIED", "two"),
        ("MODIFIED", "three"),
    ]


def test_watch_sees_objects_enter_and_leave_a_selector(core: kubernetes.client.CoreV1Api) -> None:
    since = core.create_namespaced_config_map("default", {"metadata": {"name": "a"}}).metadata.resource_version
    for labels in ({"app": "x"}, {"app": "x", "more": "1"}, {"app": None}):
        core.patch_namespaced_config_map("a", "default", {"metadata": {"labels": labels}})
    events = kubernetes.watch.Watch().stream(
        core.list_namespaced_config_map,
        "default",
        label_selector="app=x",
        resource_version=since,
        timeout_seconds=1,
    )
    assert [event["type"] for event in events] == ["ADDED", "MODIFIED", "DELETED"]


def test_watch_from_a_forgotten_resource_version_is_410_gone(kube_api: KubeApiServer) -> None:
    kube_api.emulator.history_limit = 2
    core = kubernetes.client.CoreV1Api()
    since = core.create_namespaced_config_map("default", {"metadata": {"name": "a"}}).metadata.resource_version
    for i in range(5):
        core.patch_namespaced_config_map("a", "default", {"data": {"i": str(i)}})
    with pytest.raises(ApiException) as e:
        list(
            kubernetes.watch.Watch().stream(
                core.list_namespaced_config_map, "default", resource_version=since, timeout_seconds=1
            )
        )
    assert e.value.status == 410


def test_watch_without_resource_version_lists_then_follows(
    kube_api: KubeApiServer, core: kubernetes.client.CoreV1Api
) -> None:
    core.create_namespaced_config_map("default", {"metadata": {"name": "before"}})
    watch = kubernetes.watch.Watch()
    seen = []
    for event in watch.stream(core.list_namespaced_config_map, "default", timeout_seconds=2):
        seen.append((event["type"], event["object"].metadata.name))
        if len(seen) == 1:
            core.create_namespaced_config_map("default", {"metadata": {"name": "after"}})
        if len(seen) == 2:
            watch.stop()
    assert seen == [("ADDED", "before"), ("ADDED", "after")]


def test_selectors_filter_lists(core: kubernetes.client.CoreV1Api) -> None:
    for name, labels in (("a", {"app": "x", "tier": "gpu"}), ("b", {"app": "x"}), ("c", {"app": "y"})):
        core.create_namespaced_config_map("default", {"metadata": {"name": name, "labels": labels}})

    def names(**selectors: str) -> list[str]:
        return [cm.metadata.name for cm in core.list_namespaced_config_map("default", **selectors).items]

    assert names(label_selector="app=x") == ["a", "b"]
    assert names(label_selector="app=x,tier") == ["a"]
    assert names(label_selector="app!=x") == ["c"]
    assert names(label_selector="app in (x, y),!tier") == ["b", "c"]
    assert names(field_selector="metadata.name=b") == ["b"]


def test_lists_carry_kind_and_resource_version(
    kube_api: KubeApiServer, custom: kubernetes.client.CustomObjectsApi
) -> None:
    create_ftj(custom, "a")
    listed = custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)
    assert listed["kind"] == "FineTuneJobList" and listed["apiVersion"] == f"{GROUP}/{VERSION}"
    assert listed["metadata"]["resourceVersion"] == listed["items"][0]["metadata"]["resourceVersion"]
    namespaces = kubernetes.client.CoreV1Api().list_namespace()
    assert {ns.metadata.name for ns in namespaces.items} == {"default"}


def test_deletion_waits_for_finalizers(custom: kubernetes.client.CustomObjectsApi) -> None:
    obj = finetunejob("a")
    obj["metadata"]["finalizers"] = ["kubetune.dev/cleanup"]
    created = custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, obj)
    custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a")
    marked = custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a")
    assert marked["metadata"]["deletionTimestamp"]
    assert int(marked["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a", {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as e:
        custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a")
    assert e.value.status == 404
    events = kubernetes.watch.Watch().stream(
        custom.list_namespaced_custom_object,
        GROUP,
        VERSION,
        "default",
        PLURAL,
        resource_version=created["metadata"]["resourceVersion"],
        timeout_seconds=1,
    )
    assert [event["type"] for event in events] == ["MODIFIED", "DELETED"]


def test_garbage_collection_on_request(kube_api: KubeApiServer) -> None:
    batch, core = kubernetes.client.BatchV1Api(), kubernetes.client.CoreV1Api()
    job = batch.create_namespaced_job("default", JOB)
    pod = cluster.create_pod_for_job(job)
    assert pod["metadata"]["labels"]["batch.kubernetes.io/job-name"] == "j"
    assert pod["metadata"]["ownerReferences"][0]["controller"] is True
    assert kube_api.collect_garbage() == []
    batch.delete_namespaced_job("j", "default")
    assert [obj["metadata"]["name"] for obj in kube_api.collect_garbage()] == [pod["metadata"]["name"]]
    assert core.list_namespaced_pod("default").items == []


def test_cluster_helpers_write_what_controllers_write(kube_api: KubeApiServer) -> None:
    batch = kubernetes.client.BatchV1Api()
    job = batch.create_namespaced_job("default", JOB)
    pod = cluster.create_pod_for_job(job)
    assert cluster.mark_unschedulable(pod, "no GPU")["status"]["conditions"][0]["reason"] == "Unschedulable"
    assert cluster.set_pod_running(pod)["status"]["phase"] == "Running"
    cluster.update_job_status(job, active=1, ready=1)
    done = cluster.terminate_pod(pod, 1, "CUDA out of memory")
    terminated = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert done["status"]["phase"] == "Failed" and terminated == {
        **terminated,
        "exitCode": 1,
        "message": "CUDA out of memory",
    }
    status = cluster.set_job_condition(job, "Failed", "BackoffLimitExceeded", "too many failures")["status"]
    assert [c["type"] for c in status["conditions"]] == ["FailureTarget", "Failed"]
    assert status["failed"] == 1 and status["active"] == 0 and status["startTime"]
    assert [p["metadata"]["name"] for p in cluster.pods_of_job(job)] == [pod["metadata"]["name"]]


def test_events_can_be_created_and_listed(core: kubernetes.client.CoreV1Api) -> None:
    core.create_namespaced_event(
        "default",
        {
            "metadata": {"generateName": "ftj-"},
            "reason": "Created",
            "message": "hello",
            "type": "Normal",
            "involvedObject": {"kind": "FineTuneJob", "name": "a", "namespace": "default"},
        },
    )
    kubernetes.client.EventsV1Api().create_namespaced_event(
        "default",
        {
            "metadata": {"name": "e2"},
            "reason": "Created",
            "note": "hi",
            "type": "Normal",
            "eventTime": "2026-01-01T00:00:00.000000Z",
            "reportingController": "kubetune.dev/operator",
            "reportingInstance": "x",
            "action": "Create",
        },
    )
    assert [e.message for e in core.list_namespaced_event("default").items] == ["hello"]
    assert [e.note for e in kubernetes.client.EventsV1Api().list_namespaced_event("default").items] == ["hi"]


def test_request_log_names_kubernetes_verbs(
    kube_api: KubeApiServer, custom: kubernetes.client.CustomObjectsApi
) -> None:
    create_ftj(custom, "a")
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, "default", PLURAL, "a", {"status": {}})
    custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)
    assert kube_api.emulator.verbs_by_resource() == {
        ("kubetune.dev", "finetunejobs"): {"create", "list"},
        ("kubetune.dev", "finetunejobs/status"): {"patch"},
    }


@pytest.mark.slow
def test_a_thousand_creates_stay_fast(kube_api: KubeApiServer, core: kubernetes.client.CoreV1Api) -> None:
    started = time.monotonic()
    for i in range(1000):
        core.create_namespaced_config_map("default", {"metadata": {"name": f"cm-{i}", "labels": {"i": str(i)}}})
    elapsed = time.monotonic() - started
    print(f"1000 creates in {elapsed:.2f} s: {1000 / elapsed:.0f}/s")
    assert elapsed < 30
    assert len(core.list_namespaced_config_map("default", label_selector="i=999").items) == 1


OPERATOR = textwrap.dedent("""
    import kopf

    @kopf.on.login()  # a fresh registry has none of Kopf's default login handlers
    def login(**kwargs):
        return kopf.login_via_client(**kwargs)

    @kopf.on.create('kubetune.dev', 'v1alpha1', 'finetunejobs')
    def seen(spec, patch, **_):
        patch.status['phase'] = 'Seen'
        patch.status['model'] = spec['model']

    @kopf.on.delete('kubetune.dev', 'v1alpha1', 'finetunejobs')
    def cleaned_up(logger, **_):
        logger.info('cleaned up')
""")


def wait_for(condition: Callable[[], object], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_kopf_operator_handles_a_finetunejob(
    kube_api: KubeApiServer, tmp_path: pathlib.Path, custom: kubernetes.client.CustomObjectsApi
) -> None:
    """Create (a status patch) and delete (Kopf's finalizer, removed by a JSON patch) end to end."""
    handlers = tmp_path / "operator.py"
    handlers.write_text(OPERATOR)
    args = ["run", "--standalone", "-A", "--verbose", str(handlers)]

    def status() -> dict:
        return custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a").get("status", {})

    def gone() -> bool:
        return not kube_api.emulator.get_object(FTJ, "default", "a")

    # A registry of its own: the handlers of kubetune's operator, registered in the default one when another
    # test imported kubetune_operator.main, would otherwise run too and write the status.
    previous = kopf.get_default_registry()
    kopf.set_default_registry(kopf.OperatorRegistry())
    try:
        with kopf.testing.KopfRunner(args, timeout=60) as runner:
            create_ftj(custom, "a")
            wait_for(lambda: status().get("phase") == "Seen")
            assert status()["model"] == "tiny"
            custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a")
            wait_for(gone)
    finally:
        kopf.set_default_registry(previous)
    assert runner.exception is None, runner.output
    assert runner.exit_code == 0
    assert "cleaned up" in runner.output
