"""Fixtures for every test layer: real S3 servers and the tiny model (tests.support), and the emulated
Kubernetes API (tests.kubeapi; it points KUBECONFIG at its own file when imported, before anything imports
the kubernetes client)."""

pytest_plugins = ["tests.kubeapi.fixtures", "tests.support.fixtures"]
