"""A local Kubernetes API for tests: an emulator on kmock, its server, and fixtures.

- `emulator.KubeEmulator`: the API's state and behaviour (kmock's emulator, made faithful).
- `server.KubeApiServer`: serves one on 127.0.0.1 from a thread; `.url`, `.kubeconfig_path`,
  `.emulator`, and `.call(fn, *args)` to touch the emulator's state on its own loop.
- `fixtures`: the `kube_api` fixture (load with `pytest_plugins = ["tests.kubeapi.fixtures"]`).
- `cluster`: helpers by which tests play the Job controller, the scheduler and the kubelet.
"""
