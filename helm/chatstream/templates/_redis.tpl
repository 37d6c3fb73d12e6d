{{/*
The shell that starts a bundled Redis with the ACL users of files/redis-acl.conf: the
default user's line as written, each of $ACL_USERS switched on with the SHA-256 of its
password (from ACL_PASSWORD_<user>), so no password is written in clear anywhere. The
ACL file goes to a memory-backed volume; redis-server gets the container's args ("$@").
*/}}
{{- define "chatstream.redisAclStart" -}}
set -eu
umask 077
grep '^user default ' "$ACL_RULES" > "$ACL_FILE"
for user in $ACL_USERS; do
  eval "password=\$ACL_PASSWORD_$user"
  hash=$(printf '%s' "$password" | sha256sum | cut -c1-64)
  grep "^user chatstream-$user " "$ACL_RULES" | sed "s/^user chatstream-$user /user chatstream-$user on #$hash /" >> "$ACL_FILE"
done
exec {{ if .ha }}sh /etc/chatstream-redis-ha/redis.sh{{ else }}redis-server{{ end }} --aclfile "$ACL_FILE" "$@"
{{- end }}

{{/*
A bundled Redis StatefulSet. .name: redis or redis-sessions (object name suffix and
component label); .config: its values (maxmemory, maxmemoryPolicy, persistence,
resources); .users: the ACL users it creates (api, generator, keda, and replication
and sentinel with .ha); .ha: "true" for the primary + replicas + sentinels of
redis.bundled.highAvailability (files/redis-ha/*.sh start them).
*/}}
{{- define "chatstream.redisStatefulSet" -}}
{{- $root := .root }}
{{- $redis := $root.Values.redis.bundled }}
{{- $config := .config }}
{{- $auth := $redis.auth.enabled }}
{{- $ha := .ha }}
{{- $haConfig := $redis.highAvailability }}
{{- if and $ha (lt (int $haConfig.replicas) 3) }}{{ fail "redis.bundled.highAvailability.replicas must be at least 3 (a sentinel quorum of 2 must survive losing one pod)" }}{{ end }}
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {{ include "chatstream.fullname" $root }}-{{ .name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "chatstream.componentLabels" (dict "root" $root "component" .name) | nindent 4 }}
spec:
  {{- if $ha }}
  # Stable names for every pod (REDIS_NODES, SENTINEL_NODES), resolvable before they are ready.
  serviceName: {{ include "chatstream.fullname" $root }}-{{ .name }}-headless
  # A primary and replicas, a sentinel beside each; all start together, the scripts elect.
  replicas: {{ $haConfig.replicas }}
  podManagementPolicy: Parallel
  {{- else }}
  serviceName: {{ include "chatstream.fullname" $root }}-{{ .name }}
  # One instance: a single writer (redis.bundled.highAvailability for a primary, replicas and sentinels).
  replicas: 1
  {{- end }}
  selector:
    matchLabels:
      {{- include "chatstream.selectorLabels" (dict "root" $root "component" .name) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "chatstream.componentLabels" (dict "root" $root "component" .name) | nindent 8 }}
      {{- if or $auth $ha }}
      annotations:
        {{- if $auth }}
        # New rules in files/redis-acl.conf restart Redis with them.
        checksum/acl: {{ $root.Files.Get "files/redis-acl.conf" | sha256sum }}
        {{- end }}
        {{- if $ha }}
        # New start scripts restart the set with them (one pod at a time).
        checksum/ha-scripts: {{ print ($root.Files.Get "files/redis-ha/redis.sh") ($root.Files.Get "files/redis-ha/sentinel.sh") | sha256sum }}
        {{- end }}
      {{- end }}
    spec:
      automountServiceAccountToken: false
      securityContext:
        # The redis user of the official image.
        runAsNonRoot: true
        runAsUser: 999
        runAsGroup: 999
        fsGroup: 999
        seccompProfile:
          type: RuntimeDefault
      containers:
        - name: redis
          image: {{ printf "%s:%s" $redis.image.repository $redis.image.tag }}
          imagePullPolicy: {{ $redis.image.pullPolicy }}
          {{- if $auth }}
          command: ["sh", "-c", {{ include "chatstream.redisAclStart" . | quote }}, "redis-server"]
          {{- else if $ha }}
          command: ["sh", "/etc/chatstream-redis-ha/redis.sh"]
          {{- else }}
          command: ["redis-server"]
          {{- end }}
          args:
            # Other pods connect, so protected mode (which refuses them while the default user has
            # no password) is off. The official image compiles that default in; saying it here
            # keeps any other Redis image (redis.image) working. Access is controlled by the ACL
            # users (redis.auth) and the NetworkPolicy.
            - --protected-mode
            - "no"
            # Writes fail at the limit (noeviction) or old keys go (allkeys-lru), before the kernel kills Redis.
            - --maxmemory
            - {{ $config.maxmemory | quote }}
            - --maxmemory-policy
            - {{ $config.maxmemoryPolicy | quote }}
            {{- if $config.persistence.enabled }}
            - --appendonly
            - "yes"
            {{- else }}
            - --appendonly
            - "no"
            - --save
            - ""
            {{- end }}
            - --dir
            - /data
          {{- if or $auth $ha }}
          env:
          {{- end }}
          {{- if $ha }}
            {{- include "chatstream.redisHAEnv" (dict "root" $root "auth" $auth) | nindent 12 }}
            - name: PRIMARY_WAIT_SECONDS
              value: {{ $haConfig.primaryWaitSeconds | quote }}
            {{- if $auth }}
            - name: REPLICATION_PASSWORD
              valueFrom:
                secretKeyRef:
                  name: {{ include "chatstream.redisPasswordSecret" $root }}
                  key: {{ include "chatstream.redisPasswordKey" (dict "root" $root "user" "replication") }}
            {{- end }}
          {{- end }}
          {{- if $auth }}
            - name: ACL_RULES
              value: /etc/chatstream/redis-acl.conf
            - name: ACL_FILE
              value: /run/redis/users.acl
            - name: ACL_USERS
              value: {{ join " " .users | quote }}
            {{- range $user := .users }}
            - name: ACL_PASSWORD_{{ $user }}
              valueFrom:
                secretKeyRef:
                  name: {{ include "chatstream.redisPasswordSecret" $root }}
                  key: {{ include "chatstream.redisPasswordKey" (dict "root" $root "user" $user) }}
            {{- end }}
          {{- end }}
          ports:
            - name: redis
              containerPort: 6379
              protocol: TCP
          livenessProbe:
            tcpSocket:
              port: redis
            periodSeconds: 10
            failureThreshold: 3
          readinessProbe:
            # The default user may PING without a password, and do nothing else.
            exec:
              command: ["sh", "-c", "test \"$(redis-cli ping)\" = PONG"]
            periodSeconds: 5
            timeoutSeconds: 3
          resources:
            {{- toYaml $config.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - name: data
              mountPath: /data
            {{- if $auth }}
            - name: acl-rules
              mountPath: /etc/chatstream
              readOnly: true
            - name: run
              mountPath: /run/redis
            {{- end }}
            {{- if $ha }}
            - name: ha-scripts
              mountPath: /etc/chatstream-redis-ha
              readOnly: true
            {{- end }}
        {{- if $ha }}
        - name: sentinel
          image: {{ printf "%s:%s" $redis.image.repository $redis.image.tag }}
          imagePullPolicy: {{ $redis.image.pullPolicy }}
          command: ["sh", "/etc/chatstream-redis-ha/sentinel.sh"]
          env:
            {{- include "chatstream.redisHAEnv" (dict "root" $root "auth" $auth) | nindent 12 }}
            - name: QUORUM
              value: {{ $haConfig.quorum | quote }}
            - name: DOWN_AFTER_MILLISECONDS
              value: {{ $haConfig.downAfterMilliseconds | quote }}
            - name: FAILOVER_TIMEOUT_MILLISECONDS
              value: {{ $haConfig.failoverTimeoutMilliseconds | quote }}
            - name: SENTINEL_CONFIG
              value: /sentinel/sentinel.conf
            {{- if $auth }}
            - name: SENTINEL_REDIS_PASSWORD
              valueFrom:
                secretKeyRef:
                  name: {{ include "chatstream.redisPasswordSecret" $root }}
                  key: {{ include "chatstream.redisPasswordKey" (dict "root" $root "user" "sentinel") }}
            {{- end }}
          ports:
            - name: sentinel
              containerPort: 26379
              protocol: TCP
          livenessProbe:
            tcpSocket:
              port: sentinel
            periodSeconds: 10
            failureThreshold: 3
          readinessProbe:
            exec:
              command: ["sh", "-c", "test \"$(redis-cli -p 26379 ping)\" = PONG"]
            periodSeconds: 5
            timeoutSeconds: 3
          resources:
            {{- toYaml $haConfig.sentinelResources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - name: ha-scripts
              mountPath: /etc/chatstream-redis-ha
              readOnly: true
            # A sentinel rewrites its configuration as it learns the set.
            - name: sentinel
              mountPath: /sentinel
        {{- end }}
      volumes:
        {{- if not $config.persistence.enabled }}
        - name: data
          emptyDir: {}
        {{- end }}
        {{- if $auth }}
        - name: acl-rules
          configMap:
            name: {{ include "chatstream.fullname" $root }}-redis-acl
        # The ACL file with the password hashes: in memory, never on a node's disk.
        - name: run
          emptyDir:
            medium: Memory
            sizeLimit: 1Mi
        {{- end }}
        {{- if $ha }}
        - name: ha-scripts
          configMap:
            name: {{ include "chatstream.fullname" $root }}-redis-ha-scripts
        - name: sentinel
          emptyDir:
            sizeLimit: 1Mi
        {{- end }}
  {{- if $config.persistence.enabled }}
  volumeClaimTemplates:
    - metadata:
        name: data
      spec:
        accessModes: ["ReadWriteOnce"]
        {{- with $config.persistence.storageClass }}
        storageClassName: {{ . }}
        {{- end }}
        resources:
          requests:
            storage: {{ $config.persistence.size }}
  {{- end }}
{{- end }}

{{/* The ClusterIP Service of a bundled Redis (.name: redis or redis-sessions). */}}
{{- define "chatstream.redisService" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "chatstream.fullname" .root }}-{{ .name }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "chatstream.componentLabels" (dict "root" .root "component" .name) | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "chatstream.selectorLabels" (dict "root" .root "component" .name) | nindent 4 }}
  ports:
    - name: redis
      port: 6379
      targetPort: redis
      protocol: TCP
{{- end }}

{{/* What both containers of a bundled HA Redis pod know of the set (files/redis-ha/*.sh). */}}
{{- define "chatstream.redisHAEnv" -}}
- name: REDIS_NODES
  value: {{ include "chatstream.redisHANodes" (dict "root" .root "port" 6379 "sep" " ") | quote }}
- name: SENTINEL_NODES
  value: {{ include "chatstream.redisHANodes" (dict "root" .root "port" 26379 "sep" " ") | quote }}
- name: MASTER_NAME
  value: {{ include "chatstream.redisMasterName" .root | quote }}
{{- end }}

{{/* The headless Service of the bundled HA Redis: stable pod names, published before readiness. */}}
{{- define "chatstream.redisHeadlessService" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "chatstream.fullname" .root }}-{{ .name }}-headless
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "chatstream.componentLabels" (dict "root" .root "component" .name) | nindent 4 }}
spec:
  clusterIP: None
  # A replica must reach the primary, and a sentinel resolve it, before either is ready.
  publishNotReadyAddresses: true
  selector:
    {{- include "chatstream.selectorLabels" (dict "root" .root "component" .name) | nindent 4 }}
  ports:
    - name: redis
      port: 6379
      targetPort: redis
      protocol: TCP
    - name: sentinel
      port: 26379
      targetPort: sentinel
      protocol: TCP
{{- end }}
