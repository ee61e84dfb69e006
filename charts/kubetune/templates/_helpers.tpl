{{/*
Names. Kubernetes names (and label values) are cut to 63 characters, without a trailing dash.
*/}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A name derived from the full name plus a suffix, still at most 63 characters.
Usage: include "kubetune.suffixedName" (list . "crds")
*/}}
{{- define "kubetune.suffixedName" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- $base := include "kubetune.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $base $suffix }}
{{- end }}

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end }}

{{/* Labels that select the operator pod; they never change across upgrades. */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels the operator puts on trainer pods (a contract with the operator's builders): the
PodMonitor and the NetworkPolicy select trainer pods by these.
*/}}
{{- define "kubetune.trainerSelectorLabels" -}}
app.kubernetes.io/name: kubetune-trainer
app.kubernetes.io/managed-by: kubetune
{{- end }}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}; the tag defaults to the chart's appVersion.
Usage: include "kubetune.image" (list .Values.image .Chart.AppVersion)
*/}}
{{- define "kubetune.image" -}}
{{- $image := index . 0 }}
{{- $appVersion := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $appVersion $image.tag) }}
{{- end }}
{{- end }}

{{/* Namespaces trainer pods run in, for the NetworkPolicy (see values.yaml). */}}
{{- define "kubetune.trainerNamespaces" -}}
{{- $namespaces := .Values.networkPolicy.namespaces | default .Values.watchNamespaces | default (list .Release.Namespace) }}
{{- toJson $namespaces }}
{{- end }}

{{/*
RBAC: the operator's API calls, kept here and nowhere else. tests/chart/rbac_expected.py holds
the same set and is checked against the calls the operator tests record; change both together.

Rules for the namespaces the operator watches (a Role in each, or part of the ClusterRole):
- finetunejobs: list and watch (reconciled from the watch, never read one by one), patch (Kopf
  removes the finalizer an earlier version added), delete once ttlSecondsAfterFinished has passed;
  the status subresource is where phase/progress go.
- jobs and configmaps: the trainer Job and its config.json, created and cleaned up.
- pods: watched to report why a trainer is pending or failed, and to find the pod to poll.
- events: both APIs, since Kopf posts core/v1 events and newer clients events.k8s.io/v1.
- workloads (Kueue): why a queued run waits; `spec.active` keeps a suspended run suspended.
- finetunesweeps: list and watch (synced from the watch), their status; trials are FineTuneJobs the operator
  creates and patches (a pruned trial is suspended); finalizers of sweeps: blockOwnerDeletion on the trials.
*/}}
{{- define "kubetune.rbac.namespacedRules" -}}
- apiGroups: ["kubetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["kubetune.dev"]
  resources: ["finetunesweeps"]
  verbs: ["list", "watch"]
- apiGroups: ["kubetune.dev"]
  resources: ["finetunesweeps/status"]
  verbs: ["patch"]
- apiGroups: ["kubetune.dev"]
  resources: ["finetunesweeps/finalizers"]
  verbs: ["update"]
- apiGroups: ["kubetune.dev"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
- apiGroups: ["kubetune.dev"]
  resources: ["finetunejobs/finalizers"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list", "watch", "patch"]
{{- end }}

{{/* Always cluster-wide: Kopf scans CRDs at startup, and CRDs are cluster-scoped. */}}
{{- define "kubetune.rbac.crdRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end }}

{{/* The restricted Pod Security profile, shared by every pod the chart renders. */}}
{{- define "kubetune.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "kubetune.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}
