{{/*
The server's pod template, shared by the Deployment and (multiNode.enabled) the
LeaderWorkerSet's leader and worker pods. Called with the chart's root context plus
`role`: "server" (Deployment), "leader" or "worker". Worker pods run the same
`pagedserve serve`, which finds its ranks in the LWS_* variables LeaderWorkerSet sets
and joins the leader's process group instead of serving gRPC: no ports, no probes.
*/}}
{{- define "pagedserve.podTemplate" -}}
{{- $role := .role }}
{{- $fullname := include "pagedserve.fullname" . }}
{{- $cacheDir := trimSuffix "/" .Values.cache.mountPath -}}
metadata:
  annotations:
    # Roll the pods when the health-check script changes.
    checksum/probe: {{ include (print $.Template.BasePath "/configmap-probe.yaml") . | sha256sum }}
    {{- if .Values.metrics.podAnnotations }}
    prometheus.io/scrape: "true"
    prometheus.io/port: {{ .Values.server.metricsPort | int | quote }}
    prometheus.io/path: /metrics
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  labels:
    {{- include "pagedserve.labels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  serviceAccountName: {{ include "pagedserve.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automount }}
  {{- with .Values.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ include "pagedserve.terminationGracePeriodSeconds" . }}
  # The server exits with status 1 after an engine failure; the kubelet restarts it.
  restartPolicy: Always
  containers:
    - name: pagedserve
      image: {{ include "pagedserve.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - serve
        {{- with .Values.server.extraArgs }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if ne $role "worker" }}
      ports:
        - name: grpc
          containerPort: {{ .Values.server.port | int }}
          protocol: TCP
        - name: metrics
          containerPort: {{ .Values.server.metricsPort | int }}
          protocol: TCP
      {{- end }}
      env:
        - name: PAGEDSERVE_HOST
          value: "0.0.0.0"
        {{- range $key, $name := include "pagedserve.serverEnvNames" . | fromYaml }}
        {{- $value := index $.Values.server $key }}
        {{- if not (kindIs "invalid" $value) }}
        - name: {{ $name }}
          value: {{ include "pagedserve.envValue" (dict "value" $value) | quote }}
        {{- end }}
        {{- end }}
        {{- range $key, $name := include "pagedserve.engineEnvNames" . | fromYaml }}
        {{- $value := index $.Values.engine $key }}
        {{- if not (kindIs "invalid" $value) }}
        - name: {{ $name }}
          value: {{ include "pagedserve.envValue" (dict "value" $value) | quote }}
        {{- end }}
        {{- end }}
        {{- with include "pagedserve.cpuThreads" . }}
        - name: PAGEDSERVE_CPU_THREADS
          value: {{ . | quote }}
        {{- end }}
        {{- with include "pagedserve.modelPath" . }}
        - name: PAGEDSERVE_MODEL
          value: {{ . | quote }}
        {{- end }}
        # Everything written at run time lands in the cache volume.
        - name: PAGEDSERVE_CACHE_DIR
          value: {{ $cacheDir | quote }}
        - name: HF_HOME
          value: {{ printf "%s/huggingface" $cacheDir | quote }}
        - name: CUPY_CACHE_DIR
          value: {{ printf "%s/cupy" $cacheDir | quote }}
        - name: XDG_CACHE_HOME
          value: {{ printf "%s/xdg" $cacheDir | quote }}
        - name: HOME
          value: /tmp
        {{- if .Values.tls.enabled }}
        - name: PAGEDSERVE_TLS_CERT_FILE
          value: {{ include "pagedserve.tlsDir" . }}/tls.crt
        - name: PAGEDSERVE_TLS_KEY_FILE
          value: {{ include "pagedserve.tlsDir" . }}/tls.key
        {{- if .Values.tls.clientAuth }}
        - name: PAGEDSERVE_TLS_CLIENT_CA_FILE
          value: {{ printf "%s/%s" (include "pagedserve.tlsDir" .) .Values.tls.caKey }}
        {{- end }}
        {{- end }}
        {{- if .Values.auth.enabled }}
        - name: PAGEDSERVE_AUTH_TOKEN_FILE
          value: {{ include "pagedserve.authDir" . }}/token
        {{- end }}
        {{- if .Values.otel.enabled }}
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: POD_NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
        - name: NODE_NAME
          valueFrom:
            fieldRef:
              fieldPath: spec.nodeName
        - name: OTEL_SERVICE_NAME
          value: {{ .Values.otel.serviceName | default $fullname | quote }}
        - name: OTEL_EXPORTER_OTLP_ENDPOINT
          value: {{ .Values.otel.endpoint | quote }}
        - name: OTEL_EXPORTER_OTLP_PROTOCOL
          value: {{ .Values.otel.protocol | quote }}
        - name: OTEL_TRACES_EXPORTER
          value: otlp
        # Metrics go to Prometheus (the metrics port) and logs to stdout, not OTLP.
        - name: OTEL_METRICS_EXPORTER
          value: none
        - name: OTEL_LOGS_EXPORTER
          value: none
        - name: OTEL_TRACES_SAMPLER
          value: {{ .Values.otel.sampler | quote }}
        - name: OTEL_TRACES_SAMPLER_ARG
          value: {{ .Values.otel.samplerArg | toString | quote }}
        {{- $attrs := list "k8s.pod.name=$(POD_NAME)" "k8s.namespace.name=$(POD_NAMESPACE)" "k8s.node.name=$(NODE_NAME)" "service.instance.id=$(POD_NAME)" }}
        {{- range $k, $v := .Values.otel.resourceAttributes }}
        {{- $attrs = append $attrs (printf "%s=%s" $k (toString $v)) }}
        {{- end }}
        - name: OTEL_RESOURCE_ATTRIBUTES
          value: {{ join "," $attrs | quote }}
        {{- else }}
        - name: PAGEDSERVE_DISABLE_TRACING
          value: "true"
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if ne $role "worker" }}
      startupProbe:
        {{- include "pagedserve.probe" (dict "ctx" $ "probe" .Values.probes.startup) | trim | nindent 8 }}
      readinessProbe:
        {{- include "pagedserve.probe" (dict "ctx" $ "probe" .Values.probes.readiness) | trim | nindent 8 }}
      livenessProbe:
        {{- include "pagedserve.probe" (dict "ctx" $ "probe" .Values.probes.liveness) | trim | nindent 8 }}
      {{- if gt (int .Values.server.preStopSleepSeconds) 0 }}
      lifecycle:
        preStop:
          sleep:
            seconds: {{ .Values.server.preStopSleepSeconds | int }}
      {{- end }}
      {{- end }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: cache
          mountPath: {{ $cacheDir }}
        - name: tmp
          mountPath: /tmp
        {{- if ne .Values.model.source "image" }}
        - name: model
          mountPath: {{ .Values.model.mountPath }}
          readOnly: true
        {{- end }}
        {{- if .Values.tls.enabled }}
        - name: tls
          mountPath: {{ include "pagedserve.tlsDir" . }}
          readOnly: true
        - name: probe
          mountPath: {{ include "pagedserve.probeDir" . }}
          readOnly: true
        {{- end }}
        {{- if gt (int .Values.engine.tensorParallelSize) 1 }}
        # NCCL moves data between the GPUs of a pod through shared memory.
        - name: dshm
          mountPath: /dev/shm
        {{- end }}
        {{- if .Values.auth.enabled }}
        - name: auth
          mountPath: {{ include "pagedserve.authDir" . }}
          readOnly: true
        {{- end }}
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: cache
      {{- if .Values.cache.existingClaim }}
      persistentVolumeClaim:
        claimName: {{ .Values.cache.existingClaim }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ .Values.cache.sizeLimit }}
      {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ .Values.tmp.sizeLimit }}
    {{- if eq .Values.model.source "pvc" }}
    - name: model
      persistentVolumeClaim:
        claimName: {{ .Values.model.pvc.claimName }}
        readOnly: true
    {{- else if eq .Values.model.source "hostPath" }}
    - name: model
      hostPath:
        path: {{ .Values.model.hostPath.path }}
        type: {{ .Values.model.hostPath.type }}
    {{- end }}
    {{- if .Values.tls.enabled }}
    - name: tls
      secret:
        secretName: {{ .Values.tls.secretName }}
        defaultMode: 0440
    - name: probe
      configMap:
        name: {{ $fullname }}-probe
    {{- end }}
    {{- if gt (int .Values.engine.tensorParallelSize) 1 }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ .Values.sharedMemory.sizeLimit }}
    {{- end }}
    {{- if .Values.auth.enabled }}
    - name: auth
      secret:
        secretName: {{ include "pagedserve.authSecretName" . }}
        defaultMode: 0440
        items:
          - key: {{ .Values.auth.secretKey }}
            path: token
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
