{{/* Names and labels, as `helm create` lays them out. */}}
{{- define "pagedserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pagedserve.fullname" -}}
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

{{- define "pagedserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pagedserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pagedserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pagedserve.labels" -}}
helm.sh/chart: {{ include "pagedserve.chart" . }}
{{ include "pagedserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "pagedserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pagedserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pagedserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "pagedserve.authSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "pagedserve.fullname" .)) }}
{{- end }}

{{- define "pagedserve.tlsServerName" -}}
{{- .Values.tls.serverName | default (printf "%s.%s.svc" (include "pagedserve.fullname" .) .Release.Namespace) }}
{{- end }}

{{/*
kubelet sends SIGTERM after the preStop sleep; the server then drains for
shutdownGracePeriodSeconds; the margin covers process exit before SIGKILL.
*/}}
{{- define "pagedserve.terminationGracePeriodSeconds" -}}
{{- $s := .Values.server }}
{{- add (int $s.preStopSleepSeconds) (int $s.shutdownGracePeriodSeconds) (int $s.terminationMarginSeconds) }}
{{- end }}

{{/* Fixed paths inside the container. */}}
{{- define "pagedserve.tlsDir" -}}/etc/pagedserve/tls{{- end }}
{{- define "pagedserve.authDir" -}}/etc/pagedserve/auth{{- end }}
{{- define "pagedserve.probeDir" -}}/etc/pagedserve/probe{{- end }}

{{/*
Arguments of files/health_check.py for a TLS server: verify the certificate against
the CA from the Secret under the Service's name, and present the server's own
certificate when the server demands client certificates.
*/}}
{{- define "pagedserve.healthCheckTLSArgs" -}}
{{- $dir := include "pagedserve.tlsDir" . }}
- --ca-file
- {{ printf "%s/%s" $dir .Values.tls.caKey }}
- --server-name
- {{ include "pagedserve.tlsServerName" . }}
{{- if .Values.tls.clientAuth }}
- --cert-file
- {{ $dir }}/tls.crt
- --key-file
- {{ $dir }}/tls.key
{{- end }}
{{- end }}

{{/*
One probe. Called with (dict "ctx" $ "probe" <probe values>).
Plaintext servers get kubelet's native gRPC probe; kubelet cannot do TLS, so TLS servers
are checked by the health-check script over localhost.
*/}}
{{- define "pagedserve.probe" -}}
{{- $ := .ctx }}
{{- if $.Values.tls.enabled }}
exec:
  command:
    - python3
    - {{ include "pagedserve.probeDir" $ }}/health_check.py
    - --target
    - localhost:{{ $.Values.server.port | int }}
    - --service
    - {{ $.Values.probes.healthService | quote }}
    - --timeout
    - {{ max 1 (sub (int .probe.timeoutSeconds) 1) | quote }}
    {{- include "pagedserve.healthCheckTLSArgs" $ | trim | nindent 4 }}
{{- else }}
grpc:
  port: {{ $.Values.server.port | int }}
  {{- with $.Values.probes.healthService }}
  service: {{ . | quote }}
  {{- end }}
{{- end }}
periodSeconds: {{ .probe.periodSeconds | int }}
timeoutSeconds: {{ .probe.timeoutSeconds | int }}
failureThreshold: {{ .probe.failureThreshold | int }}
{{- end }}

{{/*
Render one environment variable from a value; null values are left out so that the
server's default applies. Integers go through int64 so that large ones do not come
out in float notation.
*/}}
{{- define "pagedserve.envValue" -}}
{{- $v := .value }}
{{- if kindIs "bool" $v }}
{{- ternary "true" "false" $v }}
{{- else if and (kindIs "float64" $v) (eq $v (floor $v)) }}
{{- $v | int64 }}
{{- else }}
{{- $v }}
{{- end }}
{{- end }}

{{/* values key -> PAGEDSERVE_* variable, for engine.* and server.* settings. */}}
{{- define "pagedserve.engineEnvNames" -}}
device: PAGEDSERVE_DEVICE
dtype: PAGEDSERVE_DTYPE
blockSize: PAGEDSERVE_BLOCK_SIZE
gpuMemoryUtilization: PAGEDSERVE_GPU_MEMORY_UTILIZATION
kvCacheGb: PAGEDSERVE_KV_CACHE_GB
numKvBlocks: PAGEDSERVE_NUM_KV_BLOCKS
swapSpaceGb: PAGEDSERVE_SWAP_SPACE_GB
preemptionMode: PAGEDSERVE_PREEMPTION_MODE
maxNumSeqs: PAGEDSERVE_MAX_NUM_SEQS
maxNumBatchedTokens: PAGEDSERVE_MAX_NUM_BATCHED_TOKENS
maxModelLen: PAGEDSERVE_MAX_MODEL_LEN
enablePrefixCaching: PAGEDSERVE_ENABLE_PREFIX_CACHING
seed: PAGEDSERVE_SEED
loadFormat: PAGEDSERVE_LOAD_FORMAT
tensorParallelSize: PAGEDSERVE_TENSOR_PARALLEL_SIZE
{{- end }}

{{/*
PAGEDSERVE_CPU_THREADS: engine.cpuThreads, else the container's CPU limit rounded down
(at least 1: a thread team runs at the pace of its slowest thread, so a fraction of a
CPU cannot carry one more), else empty and the engine sizes its pool itself.
Kubernetes CPU quantities: 2, "2", "1.5", "500m".
*/}}
{{- define "pagedserve.cpuThreads" -}}
{{- $explicit := .Values.engine.cpuThreads }}
{{- $limit := dig "limits" "cpu" nil (.Values.resources | default dict) }}
{{- if not (kindIs "invalid" $explicit) }}
{{- $explicit | int64 }}
{{- else if not (kindIs "invalid" $limit) }}
{{- $q := toString $limit }}
{{- $n := 0 }}
{{- if hasSuffix "m" $q }}
{{- $n = div (trimSuffix "m" $q | atoi) 1000 }}
{{- else }}
{{- $n = $q | float64 | floor | int64 }}
{{- end }}
{{- max $n 1 }}
{{- end }}
{{- end }}

{{- define "pagedserve.serverEnvNames" -}}
port: PAGEDSERVE_PORT
metricsPort: PAGEDSERVE_METRICS_PORT
maxQueueSize: PAGEDSERVE_MAX_QUEUE_SIZE
maxN: PAGEDSERVE_MAX_N
maxStopStrings: PAGEDSERVE_MAX_STOP_STRINGS
shutdownGracePeriodSeconds: PAGEDSERVE_SHUTDOWN_GRACE_PERIOD
stepTimeoutSeconds: PAGEDSERVE_STEP_TIMEOUT
engineFailureExitDelaySeconds: PAGEDSERVE_ENGINE_FAILURE_EXIT_DELAY
metricsTenantLabel: PAGEDSERVE_METRICS_TENANT_LABEL
{{- end }}

{{/* PAGEDSERVE_MODEL from model.*; unset means the embedded default model. */}}
{{- define "pagedserve.modelPath" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "image" }}
{{- $m.path }}
{{- else if $m.path }}
{{- printf "%s/%s" (trimSuffix "/" $m.mountPath) (trimPrefix "/" $m.path) }}
{{- else }}
{{- $m.mountPath }}
{{- end }}
{{- end }}

{{/* Checks across values that the JSON schema cannot express. */}}
{{- define "pagedserve.validate" -}}
{{- $v := .Values }}
{{- if and (eq $v.model.source "pvc") (not $v.model.pvc.claimName) }}
{{- fail "model.pvc.claimName is required when model.source is pvc" }}
{{- end }}
{{- if and (eq $v.model.source "hostPath") (not $v.model.hostPath.path) }}
{{- fail "model.hostPath.path is required when model.source is hostPath" }}
{{- end }}
{{- if and (eq $v.model.source "image") $v.model.path (not (hasPrefix "/" $v.model.path)) }}
{{- fail (printf "model.path must be an absolute path inside the image when model.source is image, got %q" $v.model.path) }}
{{- end }}
{{- if and $v.tls.enabled (not $v.tls.secretName) }}
{{- fail "tls.secretName is required when tls.enabled is true" }}
{{- end }}
{{- if and $v.tls.clientAuth (not $v.tls.enabled) }}
{{- fail "tls.clientAuth needs tls.enabled: true" }}
{{- end }}
{{- if and $v.auth.enabled (not $v.auth.existingSecret) (not $v.auth.token) }}
{{- fail "auth.existingSecret or auth.token is required when auth.enabled is true" }}
{{- end }}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- fail (printf "autoscaling.minReplicas (%d) must not exceed autoscaling.maxReplicas (%d)" (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- end }}
{{- $pdb := $v.podDisruptionBudget }}
{{- if and $pdb.enabled (kindIs "invalid" $pdb.minAvailable) (kindIs "invalid" $pdb.maxUnavailable) }}
{{- fail "podDisruptionBudget.enabled needs podDisruptionBudget.maxUnavailable or podDisruptionBudget.minAvailable" }}
{{- end }}
{{- $tp := int $v.engine.tensorParallelSize }}
{{- if and $v.multiNode.enabled (or (lt $tp (int $v.multiNode.groupSize)) (ne 0 (mod $tp (int $v.multiNode.groupSize)))) }}
{{- fail (printf "multiNode.groupSize (%d) must divide engine.tensorParallelSize (%d): each pod holds the same number of ranks" (int $v.multiNode.groupSize) $tp) }}
{{- end }}
{{- if or (hasPrefix "cuda" $v.engine.device) (eq $v.engine.device "gpu") }}
{{- $gpus := 0 }}
{{- range $name, $count := ($v.resources.limits | default dict) }}
{{- if hasPrefix "nvidia.com/" $name }}{{ $gpus = add1 $gpus }}{{ end }}
{{- end }}
{{- if eq $gpus 0 }}
{{- fail (printf "engine.device is %q but resources.limits requests no nvidia.com/ GPU resource; add nvidia.com/gpu or set engine.device: cpu" $v.engine.device) }}
{{- end }}
{{- end }}
{{- end }}
