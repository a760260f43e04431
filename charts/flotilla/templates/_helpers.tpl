{{/*
Names, labels, the cluster manifest the master loads, and the checks that make
a bad value fail at render time even when schema validation is skipped.
*/}}

{{/* Every object is named after the release unless fullnameOverride is set. */}}
{{- define "flotilla.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Selects the master pod only. Worker pods, which the master creates itself,
must never carry component=master, or the Deployment's ReplicaSet would adopt
them and the Service would send API traffic to them.
*/}}
{{- define "flotilla.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: master
{{- end -}}

{{- define "flotilla.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "flotilla.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The Secret holding the API token under the key `token`. */}}
{{- define "flotilla.secretName" -}}
{{- default (include "flotilla.fullname" .) .Values.auth.existingSecret -}}
{{- end -}}

{{/* The master's ServiceAccount. */}}
{{- define "flotilla.serviceAccountName" -}}
{{- default (include "flotilla.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/*
The API token the chart's Secret holds (only when auth.existingSecret is
empty): auth.token, else the token of the release's Secret on an upgrade
(`lookup`; empty offline), else the render fails. Never random, so two
renders of the same values are the same.
*/}}
{{- define "flotilla.token" -}}
{{- $token := .Values.auth.token -}}
{{- if not $token -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "flotilla.fullname" .) -}}
{{- $token = dig "data" "token" "" $existing | b64dec -}}
{{- end -}}
{{- if not $token -}}
{{- fail "auth.token or auth.existingSecret is required: --set auth.token=\"$(openssl rand -hex 24)\", or create a Secret with the key `token` (kubectl create secret generic flotilla-token --from-literal=token=\"$(openssl rand -hex 24)\") and --set auth.existingSecret=flotilla-token" -}}
{{- end -}}
{{- $token -}}
{{- end -}}

{{/* Labels of the worker pods the master creates (see the Kubernetes runtime). */}}
{{- define "flotilla.workerSelectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: worker
{{- end -}}

{{/* repository:tag of one entry of .Values.image. */}}
{{- define "flotilla.image" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{/*
Fails the render with a message naming the bad value. values.schema.json
catches these first; this keeps them fatal under --skip-schema-validation.
*/}}
{{- define "flotilla.validate" -}}
{{- if ne (toString .Values.runtime) "kubernetes" -}}
{{- fail (printf "runtime %q is not supported by this chart: set runtime: kubernetes (the process and docker runtimes run outside Kubernetes)" (toString .Values.runtime)) -}}
{{- end -}}
{{- range $role := list "master" "worker" -}}
{{- if not (dig $role "repository" "" $.Values.image) -}}
{{- fail (printf "image.%s.repository is empty: name the %s image, e.g. flotilla-%s" $role $role $role) -}}
{{- end -}}
{{- end -}}
{{- if not .Values.workers -}}
{{- fail "workers is empty: list at least one worker, e.g. workers: [{capacity: 4}]" -}}
{{- end -}}
{{- range $i, $worker := .Values.workers -}}
{{- if lt (int $worker.capacity) 1 -}}
{{- fail (printf "workers[%d].capacity is %v: a worker needs a capacity of at least 1" $i $worker.capacity) -}}
{{- end -}}
{{- if and (hasKey $worker "replicas") (lt (int $worker.replicas) 1) -}}
{{- fail (printf "workers[%d].replicas is %v: a group needs at least 1 replica" $i $worker.replicas) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.ingress.enabled (not .Values.ingress.host) -}}
{{- fail "ingress.enabled needs ingress.host, e.g. flotilla.example.com" -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) -}}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled (the ServiceMonitor scrapes the metrics port)" -}}
{{- end -}}
{{- if and .Values.metrics.enabled (eq (int .Values.metrics.port) 5000) -}}
{{- fail "metrics.port must differ from the API's container port 5000" -}}
{{- end -}}
{{- if le (int .Values.heartbeat.timeoutSeconds) (int .Values.heartbeat.intervalSeconds) -}}
{{- fail (printf "heartbeat.timeoutSeconds (%v) must be greater than heartbeat.intervalSeconds (%v)" .Values.heartbeat.timeoutSeconds .Values.heartbeat.intervalSeconds) -}}
{{- end -}}
{{- $seen := dict -}}
{{- range .Values.sharedResources -}}
{{- if hasKey $seen .name -}}
{{- fail (printf "sharedResources: the name %q is used twice" .name) -}}
{{- end -}}
{{- $_ := set $seen .name true -}}
{{- end -}}
{{- end -}}

{{/*
The Flotilla native manifest (apiVersion flotilla.dev/v1, kind Cluster) that
the master loads from /etc/flotilla/cluster.yaml. Integers go through `int`
so large numbers are not printed in float notation; other values go through
toJson, which is valid YAML for every type.
*/}}
{{- define "flotilla.clusterManifest" -}}
apiVersion: flotilla.dev/v1
kind: Cluster
metadata:
  name: {{ .Release.Name }}
spec:
  runtime: {{ .Values.runtime }}
  image: {{ include "flotilla.image" .Values.image.worker | quote }}
  imagePullPolicy: {{ .Values.image.worker.pullPolicy }}
  workerResources:
    cpuPerCapacity: {{ toJson .Values.workerResources.cpuPerCapacity }}
    memory: {{ .Values.workerResources.memory | quote }}
  heartbeat:
    intervalSeconds: {{ int .Values.heartbeat.intervalSeconds }}
    timeoutSeconds: {{ int .Values.heartbeat.timeoutSeconds }}
  maxAttempts: {{ int .Values.maxAttempts }}
  workers:
  {{- range .Values.workers }}
    - capacity: {{ int .capacity }}
      replicas: {{ int (default 1 .replicas) }}
  {{- end }}
  resources:{{ if not .Values.sharedResources }} []{{ end }}
  {{- range .Values.sharedResources }}
    - name: {{ .name | quote }}
      type: {{ .type }}
      initialValue: {{ toJson .initialValue }}
  {{- end }}
  {{- with .Values.telemetry }}
  {{- if or .otlpEndpoint .workerOtlpEndpoint }}
  telemetry:
    {{- with .otlpEndpoint }}
    otlpEndpoint: {{ . | quote }}
    {{- end }}
    {{- with .workerOtlpEndpoint }}
    workerOtlpEndpoint: {{ . | quote }}
    {{- end }}
    {{- if hasKey . "sampleRatio" }}
    sampleRatio: {{ .sampleRatio }}
    {{- end }}
  {{- end }}
  {{- end }}
  {{- $pods := .Values.workerPods }}
  {{- if or .Values.imagePullSecrets $pods.nodeSelector $pods.tolerations $pods.affinity $pods.env $pods.volumes $pods.volumeMounts }}
  workerPods:
    {{- with .Values.imagePullSecrets }}
    imagePullSecrets: {{ toJson . }}
    {{- end }}
    {{- range $key := list "nodeSelector" "tolerations" "affinity" "env" "volumes" "volumeMounts" }}
    {{- with index $pods $key }}
    {{ $key }}: {{ toJson . }}
    {{- end }}
    {{- end }}
  {{- end }}
{{- end -}}
