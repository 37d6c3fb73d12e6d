{{/* Chart name, overridable. */}}
{{- define "chatstream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every object name: the release name, plus the chart name unless the release already says it. */}}
{{- define "chatstream.fullname" -}}
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

{{/* Labels on every object. */}}
{{- define "chatstream.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "chatstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chatstream
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component (api, generator, redis, jaeger); never change after install. */}}
{{- define "chatstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chatstream.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component's objects. */}}
{{- define "chatstream.componentLabels" -}}
{{ include "chatstream.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "chatstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chatstream.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "chatstream.apiImage" -}}
{{- printf "%s:%s" .Values.api.image.repository (default .Chart.AppVersion .Values.api.image.tag) }}
{{- end }}

{{/* The CPU-only generator image is tagged APPVERSION-cpu (see services/generator/Dockerfile). */}}
{{- define "chatstream.generatorImage" -}}
{{- $default := printf "%s%s" .Chart.AppVersion (ternary "" "-cpu" .Values.generator.gpu.enabled) }}
{{- printf "%s:%s" .Values.generator.image.repository (default $default .Values.generator.image.tag) }}
{{- end }}

{{/* Secret holding SESSION_SECRETS: the operator's, or the one this chart generates. */}}
{{- define "chatstream.sessionSecretName" -}}
{{- default (printf "%s-session" (include "chatstream.fullname" .)) .Values.api.sessionSecret.existingSecret }}
{{- end }}

{{/* Secret holding the API keys file: the operator's, or the one this chart generates. */}}
{{- define "chatstream.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "chatstream.fullname" .)) .Values.api.apiKeys.existingSecret }}
{{- end }}

{{/* Where the API keys file is mounted (API_KEYS_FILE). */}}
{{- define "chatstream.apiKeysFile" -}}
/etc/chatstream/api-keys/{{ .Values.api.apiKeys.existingSecretKey }}
{{- end }}

{{/* Host and port of Redis as seen from any namespace (KEDA's operator runs in its own). */}}
{{- define "chatstream.redisHost" -}}
{{- if include "chatstream.redisHA" . }}
{{- /* The sentinels name the primary; REDIS_URL's host is then only a placeholder. */}}
{{- include "chatstream.redisMasterName" . }}
{{- else if .Values.redis.bundled.enabled }}
{{- printf "%s-redis.%s.svc" (include "chatstream.fullname" .) .Release.Namespace }}
{{- else if .Values.redis.external.sentinel.enabled }}
{{- /* The sentinels name the primary; REDIS_URL's host is then only a placeholder. */}}
{{- if not .Values.redis.external.sentinel.addresses }}{{ fail "redis.external.sentinel.addresses is required when redis.external.sentinel.enabled=true" }}{{ end }}
{{- default .Values.redis.external.sentinel.masterName .Values.redis.external.host }}
{{- else }}
{{- required "redis.external.host is required when redis.bundled.enabled=false" .Values.redis.external.host }}
{{- end }}
{{- end }}

{{/* Whether the main Redis is the bundled primary + replicas + sentinels. */}}
{{- define "chatstream.redisHA" -}}
{{- if and .Values.redis.bundled.enabled .Values.redis.bundled.highAvailability.enabled }}true{{ end }}
{{- end }}

{{/* Whether the services find the primary through Sentinel (bundled or external). */}}
{{- define "chatstream.redisSentinel" -}}
{{- if or (include "chatstream.redisHA" .) (and (not .Values.redis.bundled.enabled) .Values.redis.external.sentinel.enabled) }}true{{ end }}
{{- end }}

{{/*
Addresses (host:port, in StatefulSet order) of the bundled HA Redis's servers
(.port 6379) or sentinels (.port 26379), by their pods' stable names; joined with .sep.
*/}}
{{- define "chatstream.redisHANodes" -}}
{{- $root := .root }}
{{- $fullname := include "chatstream.fullname" $root }}
{{- $nodes := list }}
{{- range $i := until (int $root.Values.redis.bundled.highAvailability.replicas) }}
{{- $nodes = append $nodes (printf "%s-redis-%d.%s-redis-headless.%s.svc.cluster.local:%v" $fullname $i $fullname $root.Release.Namespace $.port) }}
{{- end }}
{{- join .sep $nodes }}
{{- end }}

{{/* REDIS_SENTINEL_MASTER: the name the sentinels know the primary by. */}}
{{- define "chatstream.redisMasterName" -}}
{{- if include "chatstream.redisHA" . }}chatstream{{ else }}{{ .Values.redis.external.sentinel.masterName }}{{ end }}
{{- end }}

{{/* REDIS_SENTINELS: the bundled sentinels, or the external ones. */}}
{{- define "chatstream.redisSentinelAddresses" -}}
{{- if include "chatstream.redisHA" . }}
{{- include "chatstream.redisHANodes" (dict "root" . "port" 26379 "sep" ",") }}
{{- else }}
{{- join "," .Values.redis.external.sentinel.addresses }}
{{- end }}
{{- end }}

{{- define "chatstream.redisPort" -}}
{{- if .Values.redis.bundled.enabled }}6379{{ else }}{{ .Values.redis.external.port }}{{ end }}
{{- end }}

{{- define "chatstream.redisDatabase" -}}
{{- if .Values.redis.bundled.enabled }}0{{ else }}{{ .Values.redis.external.database }}{{ end }}
{{- end }}

{{- define "chatstream.redisTLS" -}}
{{- if and (not .Values.redis.bundled.enabled) .Values.redis.external.tls.enabled }}true{{ end }}
{{- end }}

{{/* Name of the Secret holding the ACL users' passwords; empty when Redis has no users. */}}
{{- define "chatstream.redisPasswordSecret" -}}
{{- if .Values.redis.bundled.enabled }}
{{- if .Values.redis.bundled.auth.enabled }}
{{- default (printf "%s-redis" (include "chatstream.fullname" .)) .Values.redis.bundled.auth.existingSecret }}
{{- end }}
{{- else }}
{{- .Values.redis.external.existingSecret }}
{{- end }}
{{- end }}

{{/* Key of one user's password (.user: api, generator or keda) in that Secret. */}}
{{- define "chatstream.redisPasswordKey" -}}
{{- $keys := ternary .root.Values.redis.bundled.auth.existingSecretKeys .root.Values.redis.external.existingSecretKeys .root.Values.redis.bundled.enabled }}
{{- index $keys .user }}
{{- end }}

{{/* ACL user name of a component (.user: api, generator or keda), as in files/redis-acl.conf. */}}
{{- define "chatstream.redisUser" -}}
chatstream-{{ .user }}
{{- end }}

{{/* Whether the bundled sessions Redis runs. */}}
{{- define "chatstream.sessionsRedisBundled" -}}
{{- if and .Values.redis.bundled.enabled .Values.redis.bundled.sessions.enabled }}true{{ end }}
{{- end }}

{{/*
REDIS_PASSWORD (from its Secret) and REDIS_URL of one component (.user), as container
env entries; SESSION_REDIS_URL too for the API. The URLs carry the component's ACL user
and embed the password through Kubernetes' $(VAR) expansion, so it never sits in a
ConfigMap; arq does not URL-decode it, hence the URL-safe password rule in values.
*/}}
{{- define "chatstream.redisEnv" -}}
{{- $root := .root }}
{{- $secret := include "chatstream.redisPasswordSecret" $root }}
{{- $scheme := ternary "rediss" "redis" (eq (include "chatstream.redisTLS" $root) "true") }}
{{- $auth := "" }}
{{- if $secret }}
{{- $auth = printf "%s:$(REDIS_PASSWORD)@" (include "chatstream.redisUser" .) }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ include "chatstream.redisPasswordKey" . }}
{{- end }}
- name: REDIS_URL
  value: {{ printf "%s://%s%s:%s/%s" $scheme $auth (include "chatstream.redisHost" $root) (include "chatstream.redisPort" $root) (include "chatstream.redisDatabase" $root) | quote }}
{{- $sentinel := $root.Values.redis.external.sentinel }}
{{- $useSentinel := eq (include "chatstream.redisSentinel" $root) "true" }}
# Empty: REDIS_URL's host is the primary itself.
- name: REDIS_SENTINELS
  value: {{ ternary (include "chatstream.redisSentinelAddresses" $root) "" $useSentinel | quote }}
- name: REDIS_SENTINEL_MASTER
  value: {{ include "chatstream.redisMasterName" $root | quote }}
{{- if and $useSentinel (not (include "chatstream.redisHA" $root)) $sentinel.existingSecret }}
- name: REDIS_SENTINEL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $sentinel.existingSecret }}
      key: {{ $sentinel.existingSecretKey }}
{{- else }}
- name: REDIS_SENTINEL_PASSWORD
  value: ""
{{- end }}
{{- if eq .user "api" }}
{{- $sessions := "" }}
{{- if include "chatstream.sessionsRedisBundled" $root }}
{{- $sessions = printf "redis://%s%s-redis-sessions.%s.svc:6379/0" $auth (include "chatstream.fullname" $root) $root.Release.Namespace }}
{{- else if and (not $root.Values.redis.bundled.enabled) $root.Values.redis.external.sessions.host }}
{{- $external := $root.Values.redis.external.sessions }}
{{- $sessions = printf "%s://%s%s:%v/%v" $scheme $auth $external.host $external.port $external.database }}
{{- end }}
# Empty: the sessions live in the main Redis.
- name: SESSION_REDIS_URL
  value: {{ $sessions | quote }}
{{- end }}
{{- end }}

{{/* Standard OpenTelemetry variables both services read (tracing is off without an endpoint). */}}
{{- define "chatstream.otelEnv" -}}
{{- $endpoint := .Values.tracing.otlpEndpoint }}
{{- if and (not $endpoint) .Values.tracing.jaeger.enabled }}
{{- $endpoint = printf "http://%s-jaeger:4318" (include "chatstream.fullname" .) }}
{{- end }}
{{- if $endpoint }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ $endpoint | quote }}
OTEL_EXPORTER_OTLP_PROTOCOL: {{ .Values.tracing.protocol | quote }}
OTEL_TRACES_SAMPLER: {{ .Values.tracing.sampler | quote }}
OTEL_TRACES_SAMPLER_ARG: {{ .Values.tracing.samplerArg | quote }}
{{- else }}
OTEL_TRACES_EXPORTER: "none"
{{- end }}
{{- end }}

{{/* A settings map rendered as ConfigMap data: every value a string, as the environment sees it. */}}
{{- define "chatstream.envData" -}}
{{- range $name, $value := . }}
{{- if kindIs "slice" $value }}
{{ $name }}: {{ toJson $value | quote }}
{{- else if kindIs "map" $value }}
{{ $name }}: {{ toJson $value | quote }}
{{- else if kindIs "float64" $value }}
{{ $name }}: {{ eq $value (floor $value) | ternary (int64 $value | toString) (toString $value) | quote }}
{{- else }}
{{ $name }}: {{ toString $value | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* The generator autoscaler in use: keda, hpa or none ("auto" resolved against the cluster's APIs). */}}
{{- define "chatstream.generatorAutoscaler" -}}
{{- $mode := .Values.generator.autoscaling.mode }}
{{- if eq $mode "auto" }}
{{- ternary "keda" "hpa" (.Capabilities.APIVersions.Has "keda.sh/v1alpha1/ScaledObject") }}
{{- else if has $mode (list "keda" "hpa" "none") }}
{{- $mode }}
{{- else }}
{{- fail (printf "generator.autoscaling.mode must be auto, keda, hpa or none, not %q" $mode) }}
{{- end }}
{{- end }}

{{/* The trigger KEDA scales the generators on (generator.autoscaling.keda.trigger); empty when KEDA does not scale them. */}}
{{- define "chatstream.kedaTrigger" -}}
{{- if eq (include "chatstream.generatorAutoscaler" .) "keda" }}{{ .Values.generator.autoscaling.keda.trigger }}{{ end }}
{{- end }}

{{/* The generator's metrics port (generator.env.METRICS_PORT); 0 when its metrics are off. */}}
{{- define "chatstream.generatorMetricsPort" -}}
{{- int (default 0 .Values.generator.env.METRICS_PORT) }}
{{- end }}

{{/* prometheus.io annotations of a pod serving /metrics on .port (metrics.podAnnotations; none when .port is 0). */}}
{{- define "chatstream.prometheusAnnotations" -}}
{{- if and .root.Values.metrics.podAnnotations (int .port) -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/* Namespace of the Prometheus Operator monitors. */}}
{{- define "chatstream.monitorNamespace" -}}
{{- default .Release.Namespace .Values.metrics.serviceMonitor.namespace }}
{{- end }}

{{/* HF_TOKEN from the operator's Secret, when one is named. */}}
{{- define "chatstream.hfTokenEnv" -}}
{{- with .Values.model.hfToken.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.model.hfToken.key }}
{{- end }}
{{- end }}
