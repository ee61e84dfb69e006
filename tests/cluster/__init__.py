"""The operator against a real Kubernetes control plane (kube-apiserver, etcd, the Job controller, the garbage
collector, the scheduler, Kueue), with KWOK simulating the nodes and containers. `build.sh` builds the
binaries; `controlplane` runs them; `python -m tests.cluster up|down --dir DIR` does it by hand."""
