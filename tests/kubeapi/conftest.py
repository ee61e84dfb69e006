# The fixtures live in a plugin module, so that tests/conftest.py can load them for every layer with
# `pytest_plugins = ['tests.kubeapi.fixtures']`; until then, this directory imports them itself.
from tests.kubeapi.fixtures import kube_api  # noqa: F401
