"""The catalog of FineTuneJobs the API must refuse or accept, shared by every layer that checks admission.

`tests/unit/test_api.py` runs it against the pydantic models and the offline emulation of the apiserver
(`tests/support/admission.py`); `tests/cluster/test_admission.py` runs it against the real kube-apiserver.
Each refused object names the text that every refusal must contain: the field's path, or the CEL message.
"""

from __future__ import annotations

import copy
from typing import Any

BASE: dict[str, Any] = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "support-bot", "namespace": "default"},
    "spec": {
        "model": {"source": "s3://models/llama/"},
        "dataset": {"train": "s3://datasets/support/train.jsonl"},
        "output": {"destination": "s3://artifacts/support-bot/"},
    },
}


def with_changes(*changes: tuple[str, Any]) -> dict[str, Any]:
    """BASE with dotted paths set (a value of ... deletes the key)."""
    return changed(BASE, *changes)


def changed(base: dict[str, Any], *changes: tuple[str, Any]) -> dict[str, Any]:
    """A copy of `base` with dotted paths set (a value of ... deletes the key)."""
    obj = copy.deepcopy(base)
    for dotted, value in changes:
        *parents, last = dotted.split(".")
        node = obj
        for part in parents:
            node = node.setdefault(part, {})
        if value is ...:
            node.pop(last, None)
        else:
            node[last] = value
    return obj


def _dpo(settings: dict[str, Any]) -> dict[str, Any]:
    """BASE as a DPO run on preference data, with these objective.dpo settings."""
    return with_changes(("spec.dataset.format", "preference"), ("spec.objective", {"type": "dpo", "dpo": settings}))


# (id, object, text that both error messages must contain: the field's path or name)
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("missing-spec", with_changes(("spec", ...)), "spec"),
    ("missing-model", with_changes(("spec.model", ...)), "model"),
    ("missing-dataset-train", with_changes(("spec.dataset.train", ...)), "train"),
    ("missing-output", with_changes(("spec.output", ...)), "output"),
    ("empty-model-source", with_changes(("spec.model.source", "")), "spec.model.source"),
    ("unsupported-model-scheme", with_changes(("spec.model.source", "gs://bucket/model/")), "spec.model.source"),
    ("relative-model-path", with_changes(("spec.model.source", "models/llama")), "spec.model.source"),
    ("bad-bucket-name", with_changes(("spec.model.source", "s3://UPPER_case/x")), "spec.model.source"),
    ("hf-dataset-unsupported", with_changes(("spec.dataset.train", "hf://org/data")), "spec.dataset.train"),
    ("http-output", with_changes(("spec.output.destination", "https://example.com/out")), "spec.output.destination"),
    ("unknown-top-field", with_changes(("spec.epochs", 3)), "epochs"),
    ("unknown-nested-field", with_changes(("spec.training", {"learningrate": 1e-4})), "learningrate"),
    ("wrong-type-batch", with_changes(("spec.training", {"batchSize": "four"})), "spec.training.batchSize"),
    ("wrong-type-packing", with_changes(("spec.dataset.packing", "yes")), "spec.dataset.packing"),
    ("zero-learning-rate", with_changes(("spec.training", {"learningRate": 0})), "spec.training.learningRate"),
    ("negative-epochs", with_changes(("spec.training", {"epochs": -1})), "spec.training.epochs"),
    ("eval-split-too-big", with_changes(("spec.dataset.evalSplit", 0.5)), "spec.dataset.evalSplit"),
    ("eval-split-negative", with_changes(("spec.dataset.evalSplit", -0.1)), "spec.dataset.evalSplit"),
    ("eval-split-integer-one", with_changes(("spec.dataset.evalSplit", 1)), "spec.dataset.evalSplit"),
    ("lora-rank-zero", with_changes(("spec.method", {"lora": {"r": 0}})), "spec.method.lora.r"),
    ("lora-dropout-one", with_changes(("spec.method", {"lora": {"dropout": 1.0}})), "spec.method.lora.dropout"),
    ("empty-target-modules", with_changes(("spec.method", {"lora": {"targetModules": []}})), "targetModules"),
    ("bad-method", with_changes(("spec.method", {"type": "prefix-tuning"})), "spec.method.type"),
    ("bad-quant-bits", with_changes(("spec.method", {"quantization": {"bits": 3}})), "spec.method.quantization.bits"),
    ("bad-quant-type", with_changes(("spec.method", {"quantization": {"type": "int4"}})), "quantization.type"),
    ("bad-format", with_changes(("spec.dataset.format", "alpaca")), "spec.dataset.format"),
    ("bad-precision", with_changes(("spec.training", {"precision": "int8"})), "spec.training.precision"),
    ("bad-scheduler", with_changes(("spec.training", {"lrScheduler": "step"})), "spec.training.lrScheduler"),
    (
        "quantization-with-lora",
        with_changes(("spec.method", {"type": "lora", "quantization": {"bits": 4}})),
        "method.quantization is only valid with method.type qlora",
    ),
    (
        "lora-with-full",
        with_changes(("spec.method", {"type": "full", "lora": {"r": 8}})),
        "method.lora is only valid with method.type qlora or lora",
    ),
    (
        "epochs-and-max-steps",
        with_changes(("spec.training", {"epochs": 1, "maxSteps": 100})),
        "set either training.epochs or training.maxSteps, not both",
    ),
    (
        "merge-with-full",
        with_changes(("spec.method", {"type": "full"}), ("spec.output.mergeAdapter", True)),
        "output.mergeAdapter is only valid with method.type qlora or lora",
    ),
    (
        "revision-without-hf",
        with_changes(("spec.model.revision", "main")),
        "model.revision is only valid with an hf:// source",
    ),
    (
        "token-without-hf",
        with_changes(("spec.model.tokenSecretRef", {"name": "hf-token"})),
        "model.tokenSecretRef is only valid with an hf:// source",
    ),
    (
        "template-without-response",
        with_changes(("spec.dataset.template", "Q: {prompt}\nA:")),
        "must contain {prompt} followed by {response}",
    ),
    (
        "template-response-first",
        with_changes(("spec.dataset.template", "{response} {prompt}")),
        "must contain {prompt} followed by {response}",
    ),
    ("max-length-tiny", with_changes(("spec.dataset.maxLength", 8)), "spec.dataset.maxLength"),
    ("zero-gpus-negative", with_changes(("spec.resources", {"gpus": -1})), "spec.resources.gpus"),
    ("bad-memory-quantity", with_changes(("spec.resources", {"memory": "lots"})), "spec.resources.memory"),
    ("bad-gpu-resource", with_changes(("spec.resources", {"gpuResourceName": "nvidia gpu"})), "gpuResourceName"),
    ("multi-node-cpu", with_changes(("spec.resources", {"nodes": 2, "gpus": 0})), "resources.nodes > 1"),
    (
        "bad-toleration-operator",
        with_changes(("spec.scheduling", {"tolerations": [{"key": "a", "operator": "In"}]})),
        "operator",
    ),
    ("bad-queue-name", with_changes(("spec.scheduling", {"queueName": "GPU Queue"})), "queueName"),
    ("negative-backoff", with_changes(("spec.runPolicy", {"backoffLimit": -1})), "spec.runPolicy.backoffLimit"),
    ("bad-secret-name", with_changes(("spec.storage.credentialsSecretRef", {"name": "S3_Creds"})), "name"),
    ("bad-endpoint", with_changes(("spec.storage.endpoint", "minio:9000")), "spec.storage.endpoint"),
    ("empty-secret-name", with_changes(("spec.storage.credentialsSecretRef", {"name": ""})), "name"),
    ("name-too-long", with_changes(("metadata.name", "a" * 64)), "metadata.name"),
    ("wrong-api-version", with_changes(("apiVersion", "kubetune.dev/v1")), "apiVersion"),
    ("prompt-list-not-strings", with_changes(("spec.evaluation", {"prompts": [1, 2]})), "prompts"),
    ("prompt-too-long", with_changes(("spec.evaluation", {"prompts": ["x" * 8193]})), "prompts"),
    (
        "target-module-too-long",
        with_changes(("spec.method", {"lora": {"targetModules": ["q" * 129]}})),
        "targetModules",
    ),
    ("max-steps-beyond-int64", with_changes(("spec.training", {"maxSteps": 10**32})), "spec.training.maxSteps"),
    (
        "wandb-online-without-api-key",
        with_changes(("spec.tracking", {"wandb": {"project": "support"}})),
        "tracking.wandb.apiKeySecretRef is required with mode online",
    ),
    (
        "mlflow-uri-not-http",
        with_changes(("spec.tracking", {"mlflow": {"trackingUri": "mlflow.mlflow:5000"}})),
        "spec.tracking.mlflow.trackingUri",
    ),
    ("mlflow-without-uri", with_changes(("spec.tracking", {"mlflow": {"experiment": "x"}})), "trackingUri"),
    ("wandb-bad-mode", with_changes(("spec.tracking", {"wandb": {"project": "p", "mode": "cloud"}})), "mode"),
    # objective dpo: its settings and the rules tying it to preference data.
    ("bad-objective", with_changes(("spec.objective", {"type": "ppo"})), "spec.objective.type"),
    (
        "dpo-without-preference-data",
        with_changes(("spec.objective", {"type": "dpo"})),
        "objective.type dpo needs dataset.format preference",
    ),
    (
        "preference-data-without-dpo",
        with_changes(("spec.dataset.format", "preference")),
        "dataset.format preference needs objective.type dpo",
    ),
    (
        "dpo-settings-with-sft",
        with_changes(("spec.objective", {"type": "sft", "dpo": {"beta": 0.5}})),
        "objective.dpo is only valid with objective.type dpo",
    ),
    ("dpo-beta-zero", _dpo({"beta": 0}), "spec.objective.dpo.beta"),
    ("dpo-beta-string", _dpo({"beta": "0.1"}), "spec.objective.dpo.beta"),
    ("dpo-bad-loss", _dpo({"loss": "orpo"}), "spec.objective.dpo.loss"),
    ("dpo-negative-sft-weight", _dpo({"sftWeight": -1}), "spec.objective.dpo.sftWeight"),
    ("dpo-label-smoothing-half", _dpo({"loss": "robust", "labelSmoothing": 0.5}), "spec.objective.dpo.labelSmoothing"),
    (
        "dpo-label-smoothing-with-sigmoid",
        _dpo({"labelSmoothing": 0.1}),
        "objective.dpo.labelSmoothing is only valid with objective.dpo.loss robust or exo_pair",
    ),
    (
        "dpo-prompt-fills-max-length",
        _dpo({"maxPromptLength": 2048}),
        "objective.dpo.maxPromptLength must be less than dataset.maxLength",
    ),
    ("dpo-zero-prompt-length", _dpo({"maxPromptLength": 0}), "spec.objective.dpo.maxPromptLength"),
    (
        "dpo-reference-bad-uri",
        _dpo({"referenceModel": {"source": "gs://models/ref/"}}),
        "spec.objective.dpo.referenceModel.source",
    ),
    (
        "dpo-reference-revision-without-hf",
        _dpo({"referenceModel": {"source": "s3://models/ref/", "revision": "main"}}),
        "model.revision is only valid with an hf:// source",
    ),
    ("dpo-unknown-field", _dpo({"refModel": "s3://models/ref/"}), "refModel"),
    ("preference-field-empty", with_changes(("spec.dataset.fields", {"chosen": ""})), "spec.dataset.fields.chosen"),
    # spec.resources.disk and spec.pod: additions to the pods that may not replace kubetune's own settings
    ("disk-in-gigabytes", with_changes(("spec.resources", {"disk": "100GB"})), "spec.resources.disk"),
    ("pod-env-ours", with_changes(("spec.pod", {"env": [{"name": "HF_HOME", "value": "/x"}]})), "kubetune sets"),
    (
        "pod-env-kubetune-prefix",
        with_changes(("spec.pod", {"env": [{"name": "KUBETUNE_RUN_NAME", "value": "x"}]})),
        "kubetune sets",
    ),
    (
        "pod-env-secret-inline",
        with_changes(("spec.pod", {"env": [{"name": "PROXY_PASSWORD", "value": "hunter2"}]})),
        "takes its value from a Secret",
    ),
    (
        "pod-env-value-and-from",
        with_changes(
            (
                "spec.pod",
                {"env": [{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
            )
        ),
        "set value or valueFrom, not both",
    ),
    ("pod-env-bad-name", with_changes(("spec.pod", {"env": [{"name": "1 BAD", "value": "x"}]})), "name"),
    (
        "pod-env-twice",
        with_changes(("spec.pod", {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]})),
        "pod.env",
    ),
    ("pod-volume-ours", with_changes(("spec.pod", {"volumes": [{"name": "cache", "emptyDir": {}}]})), "kubetune's own"),
    (
        "pod-mount-ours",
        with_changes(
            (
                "spec.pod",
                {"volumes": [{"name": "m", "emptyDir": {}}], "volumeMounts": [{"name": "m", "mountPath": "/tmp"}]},
            )
        ),
        "kubetune's own",
    ),
    (
        "pod-mount-without-volume",
        with_changes(("spec.pod", {"volumeMounts": [{"name": "models", "mountPath": "/models"}]})),
        "each name must be one of pod.volumes",
    ),
    (
        "pod-mount-relative",
        with_changes(
            (
                "spec.pod",
                {"volumes": [{"name": "m", "emptyDir": {}}], "volumeMounts": [{"name": "m", "mountPath": "m"}]},
            )
        ),
        "mountPath",
    ),
    ("pod-label-ours", with_changes(("spec.pod", {"labels": {"kubetune.dev/finetunejob": "x"}})), "set by kubetune"),
    ("pod-label-value-bad", with_changes(("spec.pod", {"labels": {"team": "a b"}})), "spec.pod.labels"),
    ("pod-pull-secret-bad", with_changes(("spec.pod", {"imagePullSecrets": [{"name": "Bad_Name"}]})), "name"),
]

GOOD_EDGE_CASES: list[tuple[str, dict[str, Any]]] = [
    ("defaults-only", BASE),
    (
        "pod-everything",
        with_changes(
            ("spec.model.source", "/models/llama/"),
            ("spec.resources", {"disk": "200Gi", "cpu": "8", "memory": "64Gi"}),
            (
                "spec.pod",
                {
                    "labels": {"team": "support", "example.com/cost-centre": "ml-42"},
                    "annotations": {"sidecar.istio.io/inject": "false"},
                    "env": [
                        {"name": "HTTPS_PROXY", "value": "http://proxy.internal:3128"},
                        {"name": "HF_TOKEN_PATH_HINT", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}},
                        {"name": "PROXY_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "proxy", "key": "pw"}}},
                    ],
                    "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}],
                    "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True, "subPath": "x"}],
                    "imagePullSecrets": [{"name": "registry-credentials"}],
                },
            ),
        ),
    ),
    (
        "tracking-both",
        with_changes(
            (
                "spec.tracking",
                {
                    "mlflow": {"trackingUri": "http://mlflow.mlflow:5000", "credentialsSecretRef": {"name": "mlflow"}},
                    "wandb": {"project": "support", "apiKeySecretRef": {"name": "wandb", "key": "api-key"}},
                },
            )
        ),
    ),
    ("tracking-wandb-offline-no-key", with_changes(("spec.tracking", {"wandb": {"project": "p", "mode": "offline"}}))),
    ("eval-split-zero", with_changes(("spec.dataset.evalSplit", 0))),
    ("eval-split-just-below-half", with_changes(("spec.dataset.evalSplit", 0.4999))),
    ("max-steps-only", with_changes(("spec.training", {"maxSteps": 1}))),
    ("fractional-epochs", with_changes(("spec.training", {"epochs": 0.5}))),
    ("name-63", with_changes(("metadata.name", "a" * 63))),
    ("hf-model-with-revision", with_changes(("spec.model", {"source": "hf://org/model", "revision": "v1.0"}))),
    ("absolute-paths", with_changes(("spec.model.source", "/models/llama"), ("spec.dataset.train", "/data/x.csv"))),
    ("file-uris", with_changes(("spec.output.destination", "file:///tmp/out"))),
    ("eight-bit", with_changes(("spec.method", {"type": "qlora", "quantization": {"bits": 8}}))),
    ("full-fine-tune", with_changes(("spec.method", {"type": "full"}))),
    ("cpu-only", with_changes(("spec.resources", {"gpus": 0, "cpu": "500m", "memory": "1.5Gi"}))),
    ("multiline-template", with_changes(("spec.dataset.template", "<s>[INST] {prompt} [/INST]\n\n{response}"))),
    ("exists-toleration", with_changes(("spec.scheduling", {"tolerations": [{"operator": "Exists"}]}))),
    ("affinity-passthrough", with_changes(("spec.scheduling", {"affinity": {"nodeAffinity": {"x": 1}}}))),
    ("dpo-defaults", _dpo({})),
    (
        "dpo-every-setting",
        _dpo(
            {
                "beta": 0.05,
                "loss": "robust",
                "labelSmoothing": 0.2,
                "maxPromptLength": 2047,
                "sftWeight": 1.0,
                "referenceModel": {"source": "hf://org/sft-model", "revision": "v2"},
            }
        ),
    ),
    (
        "dpo-full",
        with_changes(
            ("spec.method", {"type": "full"}), ("spec.dataset.format", "preference"), ("spec.objective.type", "dpo")
        ),
    ),
    (
        "dpo-preference-columns",
        with_changes(
            ("spec.dataset.train", "s3://datasets/prefs.parquet"),
            ("spec.dataset.format", "preference"),
            ("spec.dataset.fields", {"chosen": "good", "rejected": "bad"}),
            ("spec.objective", {"type": "dpo"}),
        ),
    ),
]


# Updates the apiserver must refuse, one per immutable section of the spec: (section, new value).
IMMUTABLE_CHANGES: list[tuple[str, Any]] = [
    ("model", {"source": "s3://models/other/"}),
    ("dataset", {"train": "s3://datasets/other.jsonl"}),
    ("training", {"learningRate": 1e-3}),
    ("method", {"type": "lora"}),
    ("objective", {"type": "dpo"}),
    ("output", {"destination": "s3://artifacts/elsewhere/"}),
    ("image", "registry.example/trainer:2"),
    ("pod", {"labels": {"team": "other"}}),
    ("tracking", {"mlflow": {"trackingUri": "http://mlflow.example:5000"}}),
    ("serviceAccountName", "s3-reader"),
    ("scheduling.priorityClassName", "training-high"),
    ("scheduling.queueName", "gpu-queue"),
]

# An update the apiserver must accept: what a user may change on a running FineTuneJob.
MUTABLE_CHANGES: tuple[tuple[str, Any], ...] = (
    # backoffLimit and activeDeadlineSeconds: the operator patches the Job (tests/cluster/test_lifecycle.py)
    ("spec.runPolicy", {"suspend": True, "backoffLimit": 5, "activeDeadlineSeconds": 7200}),
    ("spec.scheduling", {"nodeSelector": {"pool": "h100"}}),
)

# Refused before admission: no API serves the object's apiVersion, so kubectl answers with the version it
# could not map instead of a field (the models and the offline emulation name the field apiVersion).
UNSERVED: dict[str, str] = {
    "wrong-api-version": 'no matches for kind "FineTuneJob" in version "kubetune.dev/v1"',
}


def _job_yaml(spec_lines: str) -> str:
    """BASE as YAML text with these lines (indented two spaces, under spec:) added to its spec."""
    return (
        "apiVersion: kubetune.dev/v1alpha1\n"
        "kind: FineTuneJob\n"
        "metadata:\n"
        "  name: support-bot\n"
        "spec:\n"
        "  model:\n"
        "    source: s3://models/llama/\n"
        "  dataset:\n"
        "    train: s3://datasets/support/train.jsonl\n"
        "  output:\n"
        "    destination: s3://artifacts/support-bot/\n" + spec_lines
    )


# Files as people write them, where YAML's reading matters (numbers, booleans, tabs) or a field is misspelled:
# (id, file text, None when kubectl apply and `kubetune validate` must both accept it, else the text that
# `kubetune validate`'s message must contain). tests/unit/test_manifests.py runs them against kubectl's own
# YAML reading and the offline apiserver; tests/cluster/test_admission.py against the real apiserver.
WRITTEN: list[tuple[str, str, str | None]] = [
    ("exponent-without-dot", _job_yaml("  training:\n    learningRate: 2e-4\n"), None),
    ("exponent-with-dot", _job_yaml("  training:\n    learningRate: 2.0e-4\n"), None),
    ("integer-as-float", _job_yaml("  training:\n    maxSteps: 100.0\n"), None),
    ("yaml11-boolean", _job_yaml("  training:\n    gradientCheckpointing: on\n"), None),
    ("yes-is-no-string", _job_yaml("  image: yes\n"), "spec.image"),
    (
        "date-as-revision",
        _job_yaml("").replace("source: s3://models/llama/\n", "source: hf://org/model\n    revision: 2024-01-01\n"),
        None,
    ),
    ("snake-case-field", _job_yaml("  training:\n    learning_rate: 1.0e-4\n"), "did you mean `learningRate`?"),
    ("snake-case-section", _job_yaml("  run_policy:\n    suspend: true\n"), "did you mean `runPolicy`?"),
    ("misspelled-section", _job_yaml("  trainig:\n    epochs: 1\n"), "did you mean `training`?"),
    ("lowercase-field", _job_yaml("  training:\n    learningrate: 1.0e-4\n"), "did you mean `learningRate`?"),
    ("memory-in-gigabytes", _job_yaml("  resources:\n    memory: 32GB\n"), "use 32Gi or 32G"),
    ("tab-indentation", _job_yaml("  training:\n\tepochs: 1\n"), "indent with spaces"),
    ("number-as-string", _job_yaml("  training:\n    learningRate: '2e-4'\n"), "spec.training.learningRate"),
]


# -- FineTuneSweep --------------------------------------------------------------------------------------------------

SWEEP_BASE: dict[str, Any] = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneSweep",
    "metadata": {"name": "support-bot-lr", "namespace": "default"},
    "spec": {
        "template": {"spec": copy.deepcopy(BASE["spec"])},
        "parameters": [{"name": "training.learningRate", "float": {"min": 1e-5, "max": 1e-3, "log": True}}],
        "trials": 4,
        "parallelTrials": 2,
    },
}


def sweep_with(*changes: tuple[str, Any]) -> dict[str, Any]:
    """SWEEP_BASE with dotted paths set (a value of ... deletes the key)."""
    return changed(SWEEP_BASE, *changes)


def _lr(**search: Any) -> list[dict[str, Any]]:
    return [{"name": "training.learningRate", **search}]


# (id, sweep, text that both the models' and the API server's refusals contain: the field, or the rule's words)
SWEEP_BAD: list[tuple[str, dict[str, Any], str]] = [
    (
        "unknown-parameter-path",
        sweep_with(("spec.parameters", [{"name": "training.learningrate", "float": {"min": 1e-5, "max": 1e-3}}])),
        "name must be a number, integer, string or boolean field",
    ),
    (
        "parameter-outside-tunable-sections",
        sweep_with(("spec.parameters", [{"name": "output.destination", "categorical": {"choices": ["a"]}}])),
        "name must be a number, integer, string or boolean field",
    ),
    (
        "float-min-above-max",
        sweep_with(("spec.parameters", _lr(float={"min": 1e-3, "max": 1e-5}))),
        "float.min must be less than float.max",
    ),
    (
        "int-min-above-max",
        sweep_with(("spec.parameters", [{"name": "method.lora.r", "int": {"min": 64, "max": 8}}])),
        "int.min must be at most int.max",
    ),
    (
        "float-log-from-zero",
        sweep_with(("spec.parameters", _lr(float={"min": 0.0, "max": 1e-3, "log": True}))),
        "float.log needs float.min above 0",
    ),
    (
        "float-over-an-integer-field",
        sweep_with(("spec.parameters", [{"name": "method.lora.r", "float": {"min": 4, "max": 8}}])),
        "float ranges only number fields",
    ),
    (
        "two-searches-in-one-parameter",
        sweep_with(("spec.parameters", _lr(float={"min": 1e-5, "max": 1e-3}, categorical={"choices": [1e-4]}))),
        "set exactly one of float, int or categorical",
    ),
    ("grid-over-a-float", sweep_with(("spec.algorithm", {"type": "grid"})), "algorithm grid searches categorical"),
    ("parallel-trials-above-trials", sweep_with(("spec.parallelTrials", 5)), "parallelTrials must be at most trials"),
    ("too-many-trials", sweep_with(("spec.trials", 101), ("spec.parallelTrials", 1)), "spec.trials"),
    (
        "eval-loss-without-eval-set",
        sweep_with(("spec.template.spec.dataset.evalSplit", 0), ("spec.pruner.type", "none")),
        "objective evalLoss needs an eval set",
    ),
    (
        "pruning-without-evaluation",
        sweep_with(("spec.template.spec.dataset.evalSplit", 0), ("spec.objective.metric", "trainLoss")),
        "pruning compares trials at each evaluation",
    ),
    (
        "reward-metric-without-dpo",
        sweep_with(("spec.objective.metric", "rewardAccuracy")),
        "need template.spec.objective.type dpo",
    ),
    ("unknown-algorithm", sweep_with(("spec.algorithm", {"type": "bayes"})), "spec.algorithm.type"),
    ("no-parameters", sweep_with(("spec.parameters", [])), "spec.parameters"),
    (
        "bad-template",
        sweep_with(("spec.template.spec.training", {"learningRate": -1})),
        "spec.template.spec.training.learningRate",
    ),
    ("sweep-name-too-long-for-its-trials", sweep_with(("metadata.name", "s" * 60)), "metadata.name"),
]
