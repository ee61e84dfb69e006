"""Pytest fixtures for a local Kubernetes API; use with `pytest_plugins = ['tests.kubeapi.fixtures']`.

KUBECONFIG: the `kubernetes` client reads `$KUBECONFIG` once, when it is first imported, and Kopf's
login then loads that file. So this module, imported by pytest before any test module, points
`$KUBECONFIG` at a file of its own (one per process, so xdist workers do not clash); each
`kube_api` fixture writes the address of its fresh server there and also loads it into the
client's default configuration with `kubernetes.config.load_kube_config(path)`. A test that
starts Kopf (`KopfRunner`) after the fixture thus reaches the same server.
"""

from __future__ import annotations

import atexit
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Iterator

import pytest
import yaml

from tests.kubeapi.emulator import Body, KubeEmulator
from tests.kubeapi.server import KubeApiServer

KUBECONFIG_PATH = pathlib.Path(tempfile.mkdtemp(prefix="kubetune-kubeapi-")) / "kubeconfig"
atexit.register(shutil.rmtree, KUBECONFIG_PATH.parent, ignore_errors=True)
os.environ["KUBECONFIG"] = str(KUBECONFIG_PATH)
if "kubernetes.config.kube_config" in sys.modules:  # imported already: its default is read per call
    sys.modules["kubernetes.config.kube_config"].KUBE_CONFIG_DEFAULT_LOCATION = str(KUBECONFIG_PATH)

CRD_PATH = pathlib.Path(__file__).parents[2] / "crds" / "kubetune.dev_finetunejobs.yaml"

# Until the generated CRD exists: the same names and scope, any spec and status accepted.
_FALLBACK_CRD: Body = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "finetunejobs.kubetune.dev"},
    "spec": {
        "group": "kubetune.dev",
        "scope": "Namespaced",
        "names": {
            "kind": "FineTuneJob",
            "listKind": "FineTuneJobList",
            "plural": "finetunejobs",
            "singular": "finetunejob",
            "shortNames": ["ftj"],
        },
        "versions": [
            {
                "name": "v1alpha1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            }
        ],
    },
}


def finetunejob_crd() -> Body:
    """The FineTuneJob CRD manifest: the project's own once `crds/` has it, else a stand-in."""
    if CRD_PATH.exists():
        return yaml.safe_load(CRD_PATH.read_text())
    return _FALLBACK_CRD


@pytest.fixture
def kube_api() -> Iterator[KubeApiServer]:
    """A fresh, empty API server with the FineTuneJob CRD, for one test."""
    import kubernetes  # only now: $KUBECONFIG is set (see the module docstring)

    emulator = KubeEmulator()
    emulator.register_crd(finetunejob_crd())
    with KubeApiServer(emulator) as server:
        server.write_kubeconfig(KUBECONFIG_PATH)
        kubernetes.config.load_kube_config(config_file=str(KUBECONFIG_PATH))
        yield server
