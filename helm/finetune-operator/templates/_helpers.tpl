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
A map as key=value pairs joined by commas, keys sorted (FINETUNE_PREFLIGHT_NODE_SELECTOR).
*/}}
{{- define "finetune-operator.pairs" -}}
{{- $pairs := list -}}
{{- range $key := keys . | sortAlpha -}}
{{- $pairs = append $pairs (printf "%s=%s" $key (index $ $key)) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}
