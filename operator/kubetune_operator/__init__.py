"""kubetune's Kubernetes side: the FineTuneJob API and its CRD, the operator, its pure builders and status.

The `kubetune` command lives in `kubetune_cli`, the trainer in `kubetune_trainer`; this package imports only the
trainer's contract and config (pyproject's import-linter contracts)."""

API_GROUP = "kubetune.dev"
API_VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SWEEP_KIND = "FineTuneSweep"
SWEEP_PLURAL = "finetunesweeps"
