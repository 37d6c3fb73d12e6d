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
exec redis-server --aclfile "$ACL_FILE" "$@"
{{- end }}

{{/*
A bundled Redis StatefulSet. .name: redis or redis-sessions (object name suffix and
component label); .config: its values (maxmemory, maxmemoryPolicy, persistence,
resources); .users: the ACL users it creates (api, generator, keda).
*/}}
{{- define "chatstream.redisStatefulSet" -}}
{{- $root := .root }}
{{- $redis := $root.Values.redis.bundled }}
{{- $config := .config }}
{{- $auth := $redis.auth.enabled }}
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {{ include "chatstream.fullname" $root }}-{{ .name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "chatstream.componentLabels" (dict "root" $root "component" .name) | nindent 4 }}
spec:
  serviceName: {{ include "chatstream.fullname" $root }}-{{ .name }}
  # One instance: a single writer. Use redis.external for HA.
  replicas: 1
  selector:
    matchLabels:
      {{- include "chatstream.selectorLabels" (dict "root" $root "component" .name) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "chatstream.componentLabels" (dict "root" $root "component" .name) | nindent 8 }}
      {{- if $auth }}
      annotations:
        # New rules in files/redis-acl.conf restart Redis with them.
        checksum/acl: {{ $root.Files.Get "files/redis-acl.conf" | sha256sum }}
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
          {{- else }}
          command: ["redis-server"]
          {{- end }}
          args:
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
          {{- if $auth }}
          env:
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
