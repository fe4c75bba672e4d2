{{/*
Names. Resource names are cut at 50 characters: suffixes of up to 13 characters ("-progress-key") are appended, and
the result must still fit a 63-character DNS label.
*/}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 50 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "finetune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels the Deployment selects its pods by; they never change after install. */}}
{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every object the chart creates (except the CRDs, see crdLabels). */}}
{{- define "finetune-operator.labels" -}}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
app.kubernetes.io/part-of: finetune-operator
app.kubernetes.io/component: operator
{{- end }}

{{/* Release labels added to the generated CRDs, which carry their own name/part-of labels. */}}
{{- define "finetune-operator.crdLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
{{- end }}

{{/* Keeps the CRDs (and so every FineTuneJob) when the release is uninstalled. */}}
{{- define "finetune-operator.crdAnnotations" -}}
{{- if .Values.crds.keep -}}
helm.sh/resource-policy: keep
{{- end }}
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "finetune-operator.progressKeySecret" -}}
{{- default (printf "%s-progress-key" (include "finetune-operator.fullname" .)) .Values.progressKey.existingSecret }}
{{- end }}

{{- define "finetune-operator.leaseName" -}}
{{- include "finetune-operator.fullname" . }}
{{- end }}

{{- define "finetune-operator.peeringName" -}}
{{- default (include "finetune-operator.fullname" .) .Values.operator.peering.name }}
{{- end }}

{{/* repository:tag or repository@digest; the tag defaults to the chart's appVersion. */}}
{{- define "finetune-operator.imageRef" -}}
{{- $image := index . 0 }}
{{- $ctx := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $ctx.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{- define "finetune-operator.progressUrl" -}}
{{- if .Values.operator.progressUrl }}
{{- .Values.operator.progressUrl }}
{{- else }}
{{- printf "http://%s.%s.svc:%d" (include "finetune-operator.fullname" .) .Release.Namespace (int .Values.ports.progress) }}
{{- end }}
{{- end }}

{{/*
The namespaced permissions of the operator: granted cluster-wide by a ClusterRole when it watches every namespace, or
by a Role in each watched namespace. One list, so the two modes cannot drift apart. It is the set of API calls of
operator/finetune_operator (k8s.py, controller.py, kopf's watches in handlers.py) and nothing more;
tests/helm/test_cluster.py checks each call, and a few that must stay denied, with `kubectl auth can-i`.
*/}}
{{- define "finetune-operator.namespacedRules" -}}
# FineTuneJobs: kopf lists and watches them; the operator writes status only (never spec, never metadata).
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["list", "watch"]
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
# Children carry a blocking controller ownerReference to their FineTuneJob; where the
# OwnerReferencesPermissionEnforcement admission plugin is on, that needs update on the owner's finalizers.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/finalizers"]
  verbs: ["update"]
# The trainer's batch/v1 Job: watched through a label selector, created, patched (suspend, backoffLimit, deadline)
# and deleted after ttlSecondsAfterFinished. Its pods are watched, never written; the surviving workers of a Kueue
# job whose torchrun group broke are evicted (Kueue owns the Job's suspend), an eviction is not a pod write.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["pods/eviction"]
  verbs: ["create"]
# Per-job children: the ConfigMap with the rendered spec and the headless Service of multi-node jobs. Watched through
# the same label selector as the Jobs, so a deleted or hand-edited one is put back; get only after a 409.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "delete"]
# The per-job progress-token Secret: created, never read (garbage collection deletes it with its ConfigMap).
# No get/list/watch/delete, so no tenant Secret is readable or removable.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
# Events on FineTuneJobs, and the Job controller's FailedCreate events (e.g. a pod refused by a quota).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
{{- end }}

{{/*
A map as key=value pairs joined by commas, keys sorted (FINETUNE_PREFLIGHT_NODE_SELECTOR).
*/}}
{{- define "finetune-operator.pairs" -}}
{{- $pairs := list -}}
{{- range $key := keys . | sortAlpha -}}
{{- $pairs = append $pairs (printf "%s=%s" $key (index $ $key)) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}
