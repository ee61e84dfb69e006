"""The metrics tests reuse the API tests' emulated API server and in-process operator."""

from tests.api.conftest import cluster, operator  # noqa: F401  (fixtures)
from tests.kubeapi.fixtures import kube_api  # noqa: F401  (fixture)
