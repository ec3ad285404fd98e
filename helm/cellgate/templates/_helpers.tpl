{{/* Chart name, overridable. */}}
{{- define "cellgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's resources: the release name, plus the chart name
unless the release name already contains it.
*/}}
{{- define "cellgate.fullname" -}}
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

{{- define "cellgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels common to every resource. */}}
{{- define "cellgate.labels" -}}
helm.sh/chart: {{ include "cellgate.chart" . }}
app.kubernetes.io/name: {{ include "cellgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector of the gateway pods (the migration Job's pods are not selected). */}}
{{- define "cellgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cellgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "cellgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cellgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the secret settings. */}}
{{- define "cellgate.secretName" -}}
{{- default (include "cellgate.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "cellgate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* True (non-empty) when more than one pod may run: cluster mode. */}}
{{- define "cellgate.multiPod" -}}
{{- if or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{/* Where the mounted JWT public key lives in the container. */}}
{{- define "cellgate.publicKeyDir" -}}/etc/cellgate/jwt{{- end }}

{{/*
Where the CA certificates of tls.caSecret or tls.caConfigMap are mounted, one
file per key. Fixed, so that a database URL can name
sslrootcert=/etc/cellgate/ca/<key>.
*/}}
{{- define "cellgate.caDir" -}}/etc/cellgate/ca{{- end }}

{{/* True (non-empty) when CA certificates are mounted. */}}
{{- define "cellgate.caMounted" -}}
{{- if or .Values.tls.caSecret .Values.tls.caConfigMap }}true{{ end }}
{{- end }}

{{/*
Seconds Kubernetes gives a terminating pod, preStop sleep included; explicit or
derived from the drain window. After the window the gateway needs up to about
5 s more (in-flight requests, closing its clients), hence the margin.
*/}}
{{- define "cellgate.terminationGracePeriodSeconds" -}}
{{- $drain := int .Values.config.drainSecs }}
{{- $preStop := int .Values.lifecycle.preStopSleepSeconds }}
{{- $explicit := int .Values.terminationGracePeriodSeconds }}
{{- if gt $explicit 0 }}
{{- $needed := add $drain $preStop 5 }}
{{- if le $explicit $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed lifecycle.preStopSleepSeconds + config.drainSecs + 5 (%d): pods would be killed while draining or finishing their requests" $explicit $needed) }}
{{- end }}
{{- $explicit }}
{{- else }}
{{- add $drain $preStop 15 }}
{{- end }}
{{- end }}

{{/*
Consistency checks that a JSON schema cannot express. Included by the
Deployment so that every render runs them.
*/}}
{{- define "cellgate.validate" -}}
{{- $s := .Values.secrets }}
{{- if and $s.existingSecret (or $s.jwtSecret $s.databaseUrl $s.redisUrl) }}
{{- fail "secrets.existingSecret is set: leave secrets.jwtSecret, secrets.databaseUrl and secrets.redisUrl empty (the values are read from the existing Secret)" }}
{{- end }}
{{- if and .Values.config.jwt.publicKey.secretName $s.jwtSecret }}
{{- fail "config.jwt.publicKey.secretName and secrets.jwtSecret are both set: the gateway accepts one key source, choose one" }}
{{- end }}
{{- if and (include "cellgate.multiPod" .) (not $s.existingSecret) (not $s.redisUrl) }}
{{- fail "more than one pod (replicaCount > 1 or autoscaling.enabled) is cluster mode and needs Redis: set secrets.redisUrl, or CELLGATE_REDIS_URL in secrets.existingSecret" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.ingress.enabled .Values.httpRoute.enabled }}
{{- fail "ingress.enabled and httpRoute.enabled are both set: expose the gateway through one of them" }}
{{- end }}
{{- if and .Values.httpRoute.enabled (not .Values.httpRoute.parentRefs) }}
{{- fail "httpRoute.enabled needs httpRoute.parentRefs (the Gateway to attach to)" }}
{{- end }}
{{- if and .Values.tls.caSecret .Values.tls.caConfigMap }}
{{- fail "tls.caSecret and tls.caConfigMap are both set: the CA certificates are mounted from one of them, choose one" }}
{{- end }}
{{- if and .Values.tls.redisCaKey (not (include "cellgate.caMounted" .)) }}
{{- fail "tls.redisCaKey names a file of the mounted CA certificates: set tls.caSecret or tls.caConfigMap too" }}
{{- end }}
{{- if and .Values.tls.redisCaKey $s.redisUrl (not (hasPrefix "rediss://" $s.redisUrl)) }}
{{- fail "tls.redisCaKey is set but secrets.redisUrl is not rediss://: the gateway uses CELLGATE_REDIS_CA_FILE only for TLS, give the rediss:// URL" }}
{{- end }}
{{- $hours := .Values.metrics.prometheusRule.noDashboards.classHours }}
{{- if ge (int $hours.startHour) (int $hours.endHour) }}
{{- fail "metrics.prometheusRule.noDashboards.classHours.startHour must be before endHour" }}
{{- end }}
{{- end }}

{{/*
Non-secret settings, as CELLGATE_* variables. Used by the ConfigMap (gateway
pods) and inline by the migration hook Job, which runs before the ConfigMap
exists.
*/}}
{{- define "cellgate.configData" -}}
CELLGATE_PROFILE: production
CELLGATE_LISTEN_ADDR: {{ include "cellgate.listenAddr" (list .Values.config.listenHost .Values.containerPorts.http) | quote }}
CELLGATE_METRICS_ADDR: {{ include "cellgate.listenAddr" (list .Values.config.listenHost .Values.containerPorts.metrics) | quote }}
CELLGATE_LOG_FORMAT: {{ .Values.config.logFormat | quote }}
RUST_LOG: {{ .Values.config.rustLog | quote }}
CELLGATE_DIRECTORY_CACHE_TTL_SECS: {{ .Values.config.directoryCacheTtlSecs | int64 | quote }}
CELLGATE_MAX_BODY_BYTES: {{ .Values.config.maxBodyBytes | int64 | quote }}
CELLGATE_DEFAULT_SEATS: {{ .Values.config.defaultSeats | int64 | quote }}
CELLGATE_ALLOW_QUERY_TOKEN: {{ .Values.config.allowQueryToken | toString | quote }}
CELLGATE_DRAIN_SECS: {{ .Values.config.drainSecs | int64 | quote }}
CELLGATE_SESSION_TTL_SECS: {{ .Values.config.sessionTtlSecs | int64 | quote }}
CELLGATE_REDIS_PREFIX: {{ .Values.config.redisPrefix | quote }}
CELLGATE_JWT_LEEWAY_SECS: {{ .Values.config.jwt.leewaySecs | int64 | quote }}
{{- with .Values.config.limits }}
CELLGATE_HANDSHAKES_PER_MINUTE: {{ .handshakesPerMinute | int64 | quote }}
CELLGATE_HANDSHAKE_BURST: {{ .handshakeBurst | int64 | quote }}
CELLGATE_INGEST_PER_MINUTE: {{ .ingestPerMinute | int64 | quote }}
CELLGATE_INGEST_BURST: {{ .ingestBurst | int64 | quote }}
CELLGATE_MAX_SOCKET_PAYLOAD_BYTES: {{ .maxSocketPayloadBytes | int64 | quote }}
CELLGATE_MAX_SOCKETS_PER_INSTRUCTOR: {{ .maxSocketsPerInstructor | int64 | quote }}
CELLGATE_MAX_SOCKETS: {{ .maxSockets | int64 | quote }}
CELLGATE_SOCKET_QUEUE_PACKETS: {{ .socketQueuePackets | int64 | quote }}
{{- end }}
{{- with .Values.config.allowedOrigins }}
CELLGATE_ALLOWED_ORIGINS: {{ toJson . | quote }}
{{- end }}
{{- with .Values.config.trustedProxies }}
CELLGATE_TRUSTED_PROXIES: {{ toJson . | quote }}
{{- end }}
{{- with .Values.config.jwt.issuer }}
CELLGATE_JWT_ISSUER: {{ . | quote }}
{{- end }}
{{- with .Values.config.jwt.audience }}
CELLGATE_JWT_AUDIENCE: {{ . | quote }}
{{- end }}
{{- with .Values.config.jwt.algorithms }}
CELLGATE_JWT_ALGORITHMS: {{ toJson . | quote }}
{{- end }}
{{- if .Values.config.jwt.publicKey.secretName }}
CELLGATE_JWT_PUBLIC_KEY_FILE: {{ printf "%s/%s" (include "cellgate.publicKeyDir" .) .Values.config.jwt.publicKey.key | quote }}
{{- end }}
{{- with .Values.tls.redisCaKey }}
CELLGATE_REDIS_CA_FILE: {{ printf "%s/%s" (include "cellgate.caDir" $) . | quote }}
{{- end }}
{{- end }}

{{/* host:port, with brackets around an IPv6 host. */}}
{{- define "cellgate.listenAddr" -}}
{{- $host := index . 0 }}
{{- $port := index . 1 | int }}
{{- if contains ":" $host }}
{{- printf "[%s]:%d" $host $port }}
{{- else }}
{{- printf "%s:%d" $host $port }}
{{- end }}
{{- end }}

{{/*
Secret environment of a container. $ctx.secretName is the Secret to read;
$ctx.redis says whether the Redis URL is passed (the migration does not need it).
Keys are optional: a missing one reaches the gateway as a missing setting,
which it names in its start-up error. The Redis key is the exception when
several pods run (see below).
*/}}
{{- define "cellgate.secretEnv" -}}
{{- $root := .root }}
{{- $keys := $root.Values.secrets.keys }}
{{- if not $root.Values.config.jwt.publicKey.secretName }}
- name: CELLGATE_JWT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ $keys.jwtSecret }}
      optional: true
{{- end }}
- name: CELLGATE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ $keys.databaseUrl }}
      optional: true
{{- if .redis }}
- name: CELLGATE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ $keys.redisUrl }}
      {{- /*
      With several pods the key is required: a pod started without it would
      run alone (single-node mode) and silently miss the other pods' events.
      Kubernetes then refuses to start the container and names the key.
      */}}
      optional: {{ not (include "cellgate.multiPod" $root) }}
{{- end }}
{{- end }}

{{/* Data of a chart-made Secret: only the settings that were given. */}}
{{- define "cellgate.secretData" -}}
{{- $s := .Values.secrets }}
{{- with $s.jwtSecret }}
{{ $s.keys.jwtSecret }}: {{ . | b64enc | quote }}
{{- end }}
{{- with $s.databaseUrl }}
{{ $s.keys.databaseUrl }}: {{ . | b64enc | quote }}
{{- end }}
{{- with $s.redisUrl }}
{{ $s.keys.redisUrl }}: {{ . | b64enc | quote }}
{{- end }}
{{- end }}

{{/* Container security context: non-root, nothing to escalate, read-only root. */}}
{{- define "cellgate.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
{{- with .Values.securityContext.runAsUser }}
runAsUser: {{ . }}
{{- end }}
{{- with .Values.securityContext.runAsGroup }}
runAsGroup: {{ . }}
{{- end }}
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "cellgate.podSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.securityContext.runAsUser }}
runAsUser: {{ . }}
{{- end }}
{{- with .Values.securityContext.runAsGroup }}
runAsGroup: {{ . }}
{{- end }}
{{- with .Values.securityContext.fsGroup }}
fsGroup: {{ . }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Volumes shared by the gateway pods and the migration pod. */}}
{{- define "cellgate.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- if .Values.config.jwt.publicKey.secretName }}
- name: jwt-public-key
  secret:
    secretName: {{ .Values.config.jwt.publicKey.secretName }}
    items:
      - key: {{ .Values.config.jwt.publicKey.key }}
        path: {{ .Values.config.jwt.publicKey.key }}
{{- end }}
{{- with .Values.tls.caSecret }}
- name: ca-certificates
  secret:
    secretName: {{ . }}
{{- end }}
{{- with .Values.tls.caConfigMap }}
- name: ca-certificates
  configMap:
    name: {{ . }}
{{- end }}
{{- end }}

{{- define "cellgate.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.config.jwt.publicKey.secretName }}
- name: jwt-public-key
  mountPath: {{ include "cellgate.publicKeyDir" . }}
  readOnly: true
{{- end }}
{{- if include "cellgate.caMounted" . }}
- name: ca-certificates
  mountPath: {{ include "cellgate.caDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* PromQL label matchers selecting this release's series. */}}
{{- define "cellgate.metricSelector" -}}
{{- if .Values.metrics.prometheusRule.selector }}
{{- .Values.metrics.prometheusRule.selector }}
{{- else }}
{{- printf "job=%q,namespace=%q" (include "cellgate.fullname" .) .Release.Namespace }}
{{- end }}
{{- end }}
