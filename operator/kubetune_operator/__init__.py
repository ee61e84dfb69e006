"""kubetune's Kubernetes side: the FineTuneJob API, the CRD, the operator and the `kubetune` CLI."""

API_GROUP = "kubetune.dev"
API_VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SWEEP_KIND = "FineTuneSweep"
SWEEP_PLURAL = "finetunesweeps"
