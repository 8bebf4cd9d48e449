{{/* The base name of every object: the release name when it already says greenthread. */}}
{{- define "greenthread.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "greenthread.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Selector labels of one component: pass (dict "root" $ "component" "controller"). */}}
{{- define "greenthread.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "greenthread.labels" -}}
{{ include "greenthread.selectorLabels" . }}
app.kubernetes.io/part-of: greenthread
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Namespaces where Models run (default: the release namespace). */}}
{{- define "greenthread.modelNamespaces" -}}
{{- if .Values.models.namespaces -}}
{{- toJson .Values.models.namespaces -}}
{{- else -}}
{{- toJson (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{/* Non-root, read-only, no capabilities, RuntimeDefault seccomp. */}}
{{- define "greenthread.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "greenthread.podSecurityContext" -}}
runAsNonRoot: true
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The Secret holding the API keys and admin token: the user's, or the generated one;
     empty when the APIs run without keys (auth.allowUnauthenticated). */}}
{{- define "greenthread.authSecret" -}}
{{- if .Values.apiserver.auth.existingSecret -}}
{{- .Values.apiserver.auth.existingSecret -}}
{{- else if .Values.apiserver.auth.generate -}}
{{- printf "%s-auth" (include "greenthread.fullname" .) -}}
{{- end -}}
{{- end -}}
