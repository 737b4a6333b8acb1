{{/* Names, labels and the values every template shares. */}}

{{- define "llmroute.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The object name prefix: the release name, plus the chart name unless it is already in it. */}}
{{- define "llmroute.fullname" -}}
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

{{- define "llmroute.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object: call with (dict "ctx" $ "component" "operator"). */}}
{{- define "llmroute.labels" -}}
helm.sh/chart: {{ include "llmroute.chart" .ctx }}
{{ include "llmroute.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: llmroute
{{- end }}

{{/* The operator pods' selector: call with (dict "ctx" $ "component" "operator"). */}}
{{- define "llmroute.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmroute.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "llmroute.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llmroute.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The webhook Service (also the DNS names of the serving certificate). */}}
{{- define "llmroute.webhookService" -}}
{{- include "llmroute.fullname" . }}
{{- end }}

{{/* The Mutating- and ValidatingWebhookConfiguration share this name (--webhook-configuration). */}}
{{- define "llmroute.webhookConfiguration" -}}
{{- include "llmroute.fullname" . }}
{{- end }}

{{/* Self-managed TLS: the Secret the operator keeps its CA and serving certificate in. */}}
{{- define "llmroute.tlsSecret" -}}
{{- printf "%s-webhook-tls" (include "llmroute.fullname" .) }}
{{- end }}

{{/* cert-manager TLS: the Certificate and its Secret. */}}
{{- define "llmroute.certificate" -}}
{{- printf "%s-webhook" (include "llmroute.fullname" .) }}
{{- end }}

{{- define "llmroute.certSecret" -}}
{{- printf "%s-webhook-cert" (include "llmroute.fullname" .) }}
{{- end }}

{{- define "llmroute.certDir" -}}
/etc/llmroute/webhook-tls
{{- end }}

{{/* image references: repository@digest, else repository:tag (tag defaults to the appVersion). */}}
{{- define "llmroute.operatorImage" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* LLMROUTE_SIDECAR_IMAGE: the repository, or repository@digest (then used as is). */}}
{{- define "llmroute.sidecarImage" -}}
{{- if .Values.sidecar.image.digest }}
{{- printf "%s@%s" .Values.sidecar.image.repository .Values.sidecar.image.digest }}
{{- else }}
{{- .Values.sidecar.image.repository }}
{{- end }}
{{- end }}

{{- define "llmroute.sidecarVersion" -}}
{{- default .Chart.AppVersion .Values.sidecar.image.tag }}
{{- end }}

{{/* Namespaces the pod webhook never sees: system ones, the operator's own, and the user's list. */}}
{{- define "llmroute.excludedNamespaces" -}}
{{- $excluded := list "kube-system" "kube-node-lease" .Release.Namespace }}
{{- range .Values.webhook.excludeNamespaces }}
{{- $excluded = append $excluded . }}
{{- end }}
{{- toJson ($excluded | uniq) }}
{{- end }}

{{/* The rules of the operator in the namespaces it serves (ClusterRole when cluster-wide, else Roles). */}}
{{- define "llmroute.namespacedRules" -}}
- apiGroups: ["llmroute.dev"]
  resources: ["llmroutes"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["llmroute.dev"]
  resources: ["llmroutes/status"]
  verbs: ["get", "patch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: ["apps"]
  resources: ["replicasets"]
  verbs: ["get"]
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets", "daemonsets"]
  verbs: ["get", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "create", "patch", "delete"]
{{- end }}
