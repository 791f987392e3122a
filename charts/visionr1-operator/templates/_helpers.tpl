{{/* Names are cut at 63 characters: Kubernetes label values and DNS labels allow no more. */}}
{{- define "visionr1.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "visionr1.fullname" -}}
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

{{/* The MLflow objects' name leaves room for the "-mlflow" suffix. */}}
{{- define "visionr1.mlflow.fullname" -}}
{{- printf "%s-mlflow" (include "visionr1.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{/* Cluster-scoped objects (ClusterRoles and their bindings, the ClusterKopfPeering): the
release's namespace in the name, so two releases of the same name (a release per tenant
namespace) never share or overwrite one. */}}
{{- define "visionr1.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "visionr1.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "visionr1.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "visionr1.labels" -}}
helm.sh/chart: {{ include "visionr1.chart" . }}
app.kubernetes.io/name: {{ include "visionr1.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: visionr1
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "visionr1.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "visionr1.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "visionr1.mlflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "visionr1.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: mlflow
{{- end }}

{{- define "visionr1.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "visionr1.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository@digest when a digest is given (immutable), else repository:tag. */}}
{{- define "visionr1.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .default .image.tag) }}
{{- end }}
{{- end }}

{{- define "visionr1.mlflow.uri" -}}
{{- if .Values.operator.mlflowTrackingUri }}
{{- .Values.operator.mlflowTrackingUri }}
{{- else if .Values.mlflow.enabled }}
{{- /* Namespace-qualified: stage pods run in the watched namespaces, not the chart's. */}}
{{- printf "http://%s.%s.svc:%d" (include "visionr1.mlflow.fullname" .) .Release.Namespace (int .Values.mlflow.service.port) }}
{{- end }}
{{- end }}

{{/*
The permissions the operator uses in every namespace it watches, as written in
operator/visionr1_operator/rbac.py (tests/test_chart.py keeps the two equal).
*/}}
{{- define "visionr1.rbac.namespacedRules" -}}
# The runs: kopf watches them (the reconciler reads them from that watch); the reconciler
# writes only their status subresource (no finalizer, no annotation).
- apiGroups: ["visionr1.io"]
  resources: ["visionr1runs"]
  verbs: ["list", "watch"]
- apiGroups: ["visionr1.io"]
  resources: ["visionr1runs/status"]
  verbs: ["patch"]
# Stage Jobs: created, watched (kopf.on.event, only ours by label), suspended and resumed by
# patch; get on a create conflict (is the existing one this run's?); delete when a run fails
# (its unfinished Job and so its pods). Otherwise deletion is the garbage collector's.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Stage pods, only ours by label: unschedulable, image pull failures, OOMKilled, exit codes.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# Each stage's resolved config (ConfigMap) and the rendezvous Service of multi-node stages;
# get on a create conflict.
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "create"]
# Kubernetes Events on the run for every transition (`kubectl describe vr1`); list: a Job's
# FailedCreate Events (quota, Pod Security, LimitRange refusing its pods).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
# A run's spec.mlflow.credentialsSecret, read by name (get only): the operator's MLflow calls
# for that run use the run's credentials, never the operator's own.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- if and (gt (int .Values.operator.replicas) 1) .Values.watchNamespaces }}
# Standby replicas (kopf peering): each watched namespace's peering object of this release is
# created by the operator at start, read, watched and patched with the pods' keep-alives.
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["list", "watch", "patch", "create"]
{{- end }}
{{- if .Values.kueue.enabled }}
# Queued runs: Kueue owns a queued Job's spec.suspend, so spec.suspend of a run deactivates and
# reactivates the Job's Workload (found by the Job's uid: a label-selected list).
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list", "patch"]
{{- end }}
{{- end }}

{{- define "visionr1.mlflow.needsVolume" -}}
{{- if or (eq .Values.mlflow.backendStore.type "sqlite") (not .Values.mlflow.artifacts.destination) }}true{{ end }}
{{- end }}

{{/* The bundled PostgreSQL (MLflow's backend store): its objects' name and pod labels. */}}
{{- define "visionr1.postgresql.fullname" -}}
{{- printf "%s-postgresql" (include "visionr1.fullname" . | trunc 52 | trimSuffix "-") }}
{{- end }}

{{- define "visionr1.postgresql.selectorLabels" -}}
app.kubernetes.io/name: {{ include "visionr1.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: postgresql
{{- end }}

{{/* "true" when the chart runs PostgreSQL itself: MLflow on PostgreSQL without a URI of the user's. */}}
{{- define "visionr1.postgresql.bundled" -}}
{{- $m := .Values.mlflow }}
{{- if and $m.enabled (eq $m.backendStore.type "postgresql") (not $m.backendStore.postgresql.existingSecret) }}true{{ end }}
{{- end }}

{{/* The Secret holding the bundled PostgreSQL's password (key `password`). */}}
{{- define "visionr1.postgresql.secretName" -}}
{{- .Values.mlflow.postgresql.existingSecret | default (include "visionr1.postgresql.fullname" .) }}
{{- end }}

{{/* "true" when the bundled MLflow server runs with authentication. */}}
{{- define "visionr1.mlflow.auth" -}}
{{- if and .Values.mlflow.enabled .Values.mlflow.auth.enabled }}true{{ end }}
{{- end }}

{{/* The Secret holding MLflow's admin login (MLFLOW_TRACKING_USERNAME/PASSWORD). */}}
{{- define "visionr1.mlflow.authSecretName" -}}
{{- .Values.mlflow.auth.existingSecret | default (printf "%s-auth" (include "visionr1.mlflow.fullname" .)) }}
{{- end }}

{{/*
A generated secret value that stays the same across upgrades: the existing Secret's, read back
with lookup (empty under `helm template`, where a fresh one is made).
*/}}
{{- define "visionr1.keptSecretValue" -}}
{{- $existing := lookup "v1" "Secret" .namespace .name }}
{{- if and $existing (hasKey ($existing.data | default dict) .key) }}
{{- index $existing.data .key | b64dec }}
{{- else }}
{{- randAlphaNum 32 }}
{{- end }}
{{- end }}
