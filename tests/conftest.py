"""Fixtures for every test layer: real S3 servers and the tiny model (tests.support), the emulated
Kubernetes API (tests.kubeapi; it points KUBECONFIG at its own file when imported, before anything imports
the kubernetes client), and the in-process operator against it (tests.api.fixtures: tests/api, tests/metrics)."""

pytest_plugins = ["tests.kubeapi.fixtures", "tests.support.fixtures", "tests.api.fixtures"]
