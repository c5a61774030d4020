{{/*
Names, labels and the decisions that more than one template depends on.
*/}}

{{/* Chart name, overridable. */}}
{{- define "agent-server.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Release-qualified base name of every resource. Names are cut to 63 characters
because some Kubernetes name fields are limited to that (DNS labels).
*/}}
{{- define "agent-server.fullname" -}}
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

{{/* Names of the bundled services; the suffix must survive the 63-character cut. */}}
{{- define "agent-server.redis.fullname" -}}
{{- printf "%s-redis" (include "agent-server.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "agent-server.postgresql.fullname" -}}
{{- printf "%s-postgresql" (include "agent-server.fullname" . | trunc 52 | trimSuffix "-") }}
{{- end }}

{{/* Chart name and version, as used by the chart label. */}}
{{- define "agent-server.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels every resource carries. Each workload's selector is the recommended
name + instance pair; the bundled services are distinct applications
(`app.kubernetes.io/name: redis` / `postgresql`) that are `part-of` this one,
so the server's selector never matches their pods.
*/}}
{{- define "agent-server.commonLabels" -}}
helm.sh/chart: {{ include "agent-server.chart" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: {{ include "agent-server.name" . }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "agent-server.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agent-server.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "agent-server.labels" -}}
{{ include "agent-server.commonLabels" . }}
{{ include "agent-server.selectorLabels" . }}
app.kubernetes.io/version: {{ include "agent-server.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: server
{{- end }}

{{- define "agent-server.redis.selectorLabels" -}}
app.kubernetes.io/name: redis
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "agent-server.redis.labels" -}}
{{ include "agent-server.commonLabels" . }}
{{ include "agent-server.redis.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.redis.image.tag | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: cache
{{- end }}

{{- define "agent-server.postgresql.selectorLabels" -}}
app.kubernetes.io/name: postgresql
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "agent-server.postgresql.labels" -}}
{{ include "agent-server.commonLabels" . }}
{{ include "agent-server.postgresql.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.postgresql.image.tag | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: database
{{- end }}

{{/* Labels of the `helm test` pod: deliberately outside every selector above. */}}
{{- define "agent-server.test.labels" -}}
{{ include "agent-server.commonLabels" . }}
app.kubernetes.io/name: {{ printf "%s-test" (include "agent-server.name" .) }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
{{- end }}

{{/* `metadata.annotations` content shared by every resource (may be empty). */}}
{{- define "agent-server.annotations" -}}
{{- with .Values.commonAnnotations }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{- define "agent-server.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "agent-server.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Images: registry/repository, then @digest or :tag. */}}
{{- define "agent-server.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{- define "agent-server.imageRef" -}}
{{- $repo := .image.repository }}
{{- if .image.registry }}
{{- $repo = printf "%s/%s" .image.registry .image.repository }}
{{- end }}
{{- if .image.digest }}
{{- printf "%s@%s" $repo .image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (toString .tag) }}
{{- end }}
{{- end }}

{{- define "agent-server.image" -}}
{{- include "agent-server.imageRef" (dict "image" .Values.image "tag" (include "agent-server.imageTag" .)) }}
{{- end }}

{{- define "agent-server.redis.image" -}}
{{- include "agent-server.imageRef" (dict "image" .Values.redis.image "tag" .Values.redis.image.tag) }}
{{- end }}

{{- define "agent-server.postgresql.image" -}}
{{- include "agent-server.imageRef" (dict "image" .Values.postgresql.image "tag" .Values.postgresql.image.tag) }}
{{- end }}

{{/* The Secret the server reads with envFrom: the user's, or the chart's. */}}
{{- define "agent-server.secretName" -}}
{{- default (include "agent-server.fullname" .) .Values.auth.existingSecret }}
{{- end }}

{{/*
A secret value that must not change between upgrades. In order of preference:
the value given in values, the value already stored in the cluster (`lookup`;
empty under `helm template`), or a fresh random string. The result is memoised
for the rest of this render on the root template context, which Helm shares
between the templates of a chart, so every template that includes it (the
Secret, the bundled service, the checksum annotation) sees the same value.
`.Values` is left untouched: it must never carry keys the schema forbids.
Arguments: dict with ctx, key (memo key), secret (Secret name), field
(key in that Secret), given (value from values), length.
*/}}
{{- define "agent-server.persistentSecret" -}}
{{- $ctx := .ctx }}
{{- if not (hasKey $ctx "__generatedSecrets") }}
{{- $_ := set $ctx "__generatedSecrets" dict }}
{{- end }}
{{- $memo := get $ctx "__generatedSecrets" }}
{{- if not (hasKey $memo .key) }}
{{- $value := toString (default "" .given) }}
{{- if not $value }}
{{- $existing := lookup "v1" "Secret" $ctx.Release.Namespace .secret | default dict }}
{{- $value = dig "data" .field "" $existing | b64dec }}
{{- end }}
{{- if not $value }}
{{- $value = randAlphaNum (int .length) }}
{{- end }}
{{- $_ := set $memo .key $value }}
{{- end }}
{{- get $memo .key }}
{{- end }}

{{- define "agent-server.secretKey" -}}
{{- include "agent-server.persistentSecret" (dict "ctx" . "key" "secretKey" "secret" (include "agent-server.fullname" .) "field" "SECRET_KEY" "given" .Values.auth.secretKey "length" 64) }}
{{- end }}

{{- define "agent-server.adminPassword" -}}
{{- include "agent-server.persistentSecret" (dict "ctx" . "key" "adminPassword" "secret" (include "agent-server.fullname" .) "field" "ADMIN_PASSWORD" "given" .Values.auth.adminPassword "length" 24) }}
{{- end }}

{{- define "agent-server.postgresql.password" -}}
{{- include "agent-server.persistentSecret" (dict "ctx" . "key" "postgresqlPassword" "secret" (include "agent-server.postgresql.fullname" .) "field" "password" "given" .Values.postgresql.auth.password "length" 32) }}
{{- end }}

{{- define "agent-server.redis.password" -}}
{{- include "agent-server.persistentSecret" (dict "ctx" . "key" "redisPassword" "secret" (include "agent-server.redis.fullname" .) "field" "password" "given" .Values.redis.auth.password "length" 32) }}
{{- end }}

{{/*
Where DATABASE_URL and the database password come from. The password never
goes into the URL: libpq reads it from PGPASSWORD, so a password with
URL-reserved characters needs no escaping and never shows up in a connection
error that quotes the URL.
  bundled      - the chart's PostgreSQL; the URL (no password) is composed here,
                 PGPASSWORD comes from its Secret
  externalHost - externalDatabase.host/port/...; the URL is composed here,
                 PGPASSWORD from externalDatabase.existingSecret or .password
  externalUrl  - externalDatabase.url, kept in the chart's Secret as written
  secretUrl    - a complete URL in externalDatabase.existingSecret
  file         - a file the operator mounts (secretFiles.databaseUrl)
  user         - the user's auth.existingSecret holds DATABASE_URL
  none         - nothing configured (refused by agent-server.validate)
*/}}
{{- define "agent-server.database.mode" -}}
{{- $db := .Values.externalDatabase }}
{{- if .Values.postgresql.enabled }}bundled
{{- else if .Values.secretFiles.databaseUrl }}file
{{- else if and $db.existingSecret $db.existingSecretUrlKey }}secretUrl
{{- else if $db.url }}externalUrl
{{- else if $db.host }}externalHost
{{- else if .Values.auth.existingSecret }}user
{{- else }}none
{{- end }}
{{- end }}

{{/*
The Secret and key PGPASSWORD comes from, as YAML (`name`, `key`), or empty
when the database needs no password from the chart (client certificates, a
URL that carries everything, the user's own Secret).
*/}}
{{- define "agent-server.database.passwordRef" -}}
{{- $mode := include "agent-server.database.mode" . }}
{{- $db := .Values.externalDatabase }}
{{- if eq $mode "bundled" }}
{{- if .Values.postgresql.auth.existingSecret }}
name: {{ .Values.postgresql.auth.existingSecret }}
key: {{ .Values.postgresql.auth.existingSecretPasswordKey }}
{{- else }}
name: {{ include "agent-server.postgresql.fullname" . }}
key: password
{{- end }}
{{- else if and (has $mode (list "externalHost" "externalUrl")) $db.existingSecret }}
name: {{ $db.existingSecret }}
key: {{ $db.existingSecretPasswordKey }}
{{- else if and (has $mode (list "externalHost" "externalUrl")) $db.password }}
name: {{ include "agent-server.fullname" . }}
key: PGPASSWORD
{{- end }}
{{- end }}

{{/* DATABASE_URL composed by the chart (bundled and externalHost modes): no password in it. */}}
{{- define "agent-server.database.composedUrl" -}}
{{- $v := .Values }}
{{- if $v.postgresql.enabled }}
{{- printf "postgresql://%s@%s:5432/%s" ($v.postgresql.auth.username | urlquery) (include "agent-server.postgresql.fullname" .) ($v.postgresql.auth.database | urlquery) }}
{{- else }}
{{- $db := $v.externalDatabase }}
{{- $url := printf "postgresql://%s@%s:%d/%s" ($db.user | urlquery) $db.host (int $db.port) ($db.database | urlquery) }}
{{- if $db.sslMode }}
{{- $url = printf "%s?sslmode=%s" $url $db.sslMode }}
{{- end }}
{{- $url }}
{{- end }}
{{- end }}

{{/*
The TCP ports the server's database connections go to, one per line: the
NetworkPolicy opens exactly these. In externalUrl mode they are read from the
URL the server uses (every host of a multi-host URL, a `port=` parameter, or
libpq's 5432); where the URL lives in a Secret the chart cannot read, it is
externalDatabase.port, which the README says must match.
*/}}
{{- define "agent-server.database.ports" -}}
{{- $mode := include "agent-server.database.mode" . }}
{{- $db := .Values.externalDatabase }}
{{- if eq $mode "bundled" }}5432
{{- else if eq $mode "externalUrl" }}
{{- if not (hasPrefix "sqlite:" $db.url) }}
{{- $ports := list }}
{{- $rest := regexReplaceAll "^[A-Za-z][A-Za-z0-9+.-]*://" $db.url "" }}
{{- $authority := regexReplaceAll "[/?].*$" $rest "" }}
{{- $hosts := regexReplaceAll "^.*@" $authority "" }}
{{- $query := regexFind `\?.*$` $rest }}
{{- $queryPort := regexFind "[?&]port=[0-9]+(,[0-9]+)*" $query | regexFind "[0-9].*" }}
{{- if $queryPort }}
{{- $ports = splitList "," $queryPort }}
{{- else }}
{{- range splitList "," $hosts }}
{{- $port := regexFind ":[0-9]+$" (regexReplaceAll `^\[[^]]*\]` . "") | trimPrefix ":" }}
{{- $ports = append $ports (default "5432" $port) }}
{{- end }}
{{- end }}
{{- $ports | uniq | join "\n" }}
{{- end }}
{{- else if ne $mode "none" }}
{{- if not (hasPrefix "sqlite:" $db.url) }}{{ $db.port }}{{ end }}
{{- end }}
{{- end }}

{{/*
Where REDIS_PASSWORD comes from: inline (the chart's Secret; possibly empty),
env (a `secretKeyRef`), or user (the user's auth.existingSecret).
*/}}
{{- define "agent-server.redis.passwordMode" -}}
{{- if .Values.secretFiles.redisPassword }}file
{{- else if .Values.redis.enabled }}
{{- if not .Values.redis.auth.enabled }}inline
{{- else if or .Values.redis.auth.existingSecret .Values.auth.existingSecret }}env
{{- else }}inline
{{- end }}
{{- else if .Values.externalRedis.existingSecret }}env
{{- else if .Values.auth.existingSecret }}user
{{- else }}inline
{{- end }}
{{- end }}

{{- define "agent-server.redis.passwordRef" -}}
{{- if .Values.redis.enabled }}
{{- if .Values.redis.auth.existingSecret }}
name: {{ .Values.redis.auth.existingSecret }}
key: {{ .Values.redis.auth.existingSecretPasswordKey }}
{{- else }}
name: {{ include "agent-server.redis.fullname" . }}
key: password
{{- end }}
{{- else }}
name: {{ .Values.externalRedis.existingSecret }}
key: {{ .Values.externalRedis.existingSecretPasswordKey }}
{{- end }}
{{- end }}

{{- define "agent-server.redis.inlinePassword" -}}
{{- if .Values.redis.enabled }}
{{- if .Values.redis.auth.enabled }}{{ include "agent-server.redis.password" . }}{{ end }}
{{- else }}
{{- .Values.externalRedis.password }}
{{- end }}
{{- end }}

{{/* REDIS_HOST: empty means "no Redis", which the server accepts for one replica. */}}
{{- define "agent-server.redis.host" -}}
{{- if .Values.redis.enabled }}
{{- include "agent-server.redis.fullname" . }}
{{- else }}
{{- .Values.externalRedis.host }}
{{- end }}
{{- end }}

{{- define "agent-server.redis.port" -}}
{{- if .Values.redis.enabled }}6379{{ else }}{{ .Values.externalRedis.port }}{{ end }}
{{- end }}

{{/*
Graceful shutdown. The image has no shell, so the preStop pause is either the
native `sleep` action (Kubernetes >= 1.30, or forced by preStop.nativeSleep)
or, where that is missing, the server's own DRAIN_DELAY: it keeps serving
with /readiness at 503 for that long after SIGTERM. Either way the pod keeps
answering while endpoint removal reaches every proxy.
*/}}
{{- define "agent-server.nativePreStop" -}}
{{- $mode := .Values.preStop.nativeSleep }}
{{- $native := false }}
{{- if kindIs "bool" $mode }}
{{- $native = $mode }}
{{- else }}
{{- $native = semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version }}
{{- end }}
{{- if and $native (gt (int .Values.preStop.sleepSeconds) 0) }}true{{ end }}
{{- end }}

{{- define "agent-server.preStopSeconds" -}}
{{- if include "agent-server.nativePreStop" . }}{{ int .Values.preStop.sleepSeconds }}{{ else }}0{{ end }}
{{- end }}

{{- define "agent-server.drainDelay" -}}
{{- if include "agent-server.nativePreStop" . }}0{{ else }}{{ int .Values.preStop.sleepSeconds }}{{ end }}
{{- end }}

{{- define "agent-server.shutdownTimeout" -}}
{{- if kindIs "invalid" .Values.config.shutdownTimeout }}
{{- sub (int .Values.terminationGracePeriodSeconds) (add (int (include "agent-server.preStopSeconds" .)) 5) }}
{{- else }}
{{- int .Values.config.shutdownTimeout }}
{{- end }}
{{- end }}

{{/* Public URL of the server (SERVER_URL). */}}
{{- define "agent-server.serverUrl" -}}
{{- if .Values.config.serverUrl }}
{{- .Values.config.serverUrl }}
{{- else if .Values.ingress.enabled }}
{{- printf "%s://%s" (ternary "https" "http" .Values.ingress.tls.enabled) .Values.ingress.host }}
{{- else if .Values.gatewayApi.enabled }}
{{- printf "https://%s" (first (default (list .Values.ingress.host) .Values.gatewayApi.hostnames)) }}
{{- else }}
{{- printf "http://%s.%s.svc:%d" (include "agent-server.fullname" .) .Release.Namespace (int .Values.service.port) }}
{{- end }}
{{- end }}

{{/*
Combinations the schema cannot express. Rendering fails with a message that
names the values to change, rather than producing pods that crash-loop.
*/}}
{{- define "agent-server.validate" -}}
{{- include "agent-server.checkSecretGeneration" . }}
{{- $errors := list }}
{{- $replicasMayExceedOne := or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1) }}
{{- if and $replicasMayExceedOne (not (include "agent-server.redis.host" .)) }}
{{- $errors = append $errors "more than one replica (replicaCount > 1 or autoscaling.enabled) needs Redis: set redis.enabled=true or externalRedis.host" }}
{{- end }}
{{- if and $replicasMayExceedOne (not .Values.postgresql.enabled) (hasPrefix "sqlite:" .Values.externalDatabase.url) }}
{{- $errors = append $errors "SQLite (externalDatabase.url=sqlite://...) serves a single replica only: set replicaCount=1 and autoscaling.enabled=false" }}
{{- end }}
{{- $dbMode := include "agent-server.database.mode" . }}
{{- $db := .Values.externalDatabase }}
{{- if eq $dbMode "none" }}
{{- $errors = append $errors "no database: enable postgresql, or set externalDatabase.url, externalDatabase.host, externalDatabase.existingSecret with existingSecretUrlKey, or secretFiles.databaseUrl" }}
{{- end }}
{{- if and (not .Values.postgresql.enabled) $db.existingSecret (not $db.existingSecretUrlKey) (not $db.host) (not $db.url) }}
{{- $errors = append $errors "externalDatabase.existingSecret holds only the password: set externalDatabase.host (or url) too, or name a complete URL with externalDatabase.existingSecretUrlKey" }}
{{- end }}
{{- if and .Values.auth.existingSecret (eq $dbMode "externalUrl") }}
{{- $errors = append $errors "externalDatabase.url is not used with auth.existingSecret: put DATABASE_URL in that Secret, or put the URL in externalDatabase.existingSecret (existingSecretUrlKey)" }}
{{- end }}
{{- if and .Values.auth.existingSecret (has $dbMode (list "externalHost" "externalUrl")) $db.password (not $db.existingSecret) }}
{{- $errors = append $errors "externalDatabase.password is not used with auth.existingSecret: give the password through externalDatabase.existingSecret" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (eq (int .Values.replicaCount) 0) }}
{{- $errors = append $errors "replicaCount: 0 parks the server only with autoscaling.enabled=false (an HPA would scale it back up)" }}
{{- end }}
{{- range $name, $resources := dict "resources" .Values.resources "redis.resources" .Values.redis.resources "postgresql.resources" .Values.postgresql.resources "tests.resources" .Values.tests.resources }}
{{- $requests := $resources.requests | default dict }}
{{- $limits := $resources.limits | default dict }}
{{- range $resource, $request := $requests }}
{{- if hasKey $limits $resource }}
{{- $limit := get $limits $resource }}
{{- if gt (include "agent-server.quantity" $request | float64) (include "agent-server.quantity" $limit | float64) }}
{{- $errors = append $errors (printf "%s.requests.%s (%v) exceeds %s.limits.%s (%v), which the API server refuses. Helm merges the chart's default requests under limits you set alone: set %s.requests.%s as well, or null to let Kubernetes use the limit" $name $resource $request $name $resource $limit $name $resource) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- with include "agent-server.pdbProblem" . }}
{{- $errors = append $errors . }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- $errors = append $errors "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- $grace := int .Values.terminationGracePeriodSeconds }}
{{- $preStop := int (include "agent-server.preStopSeconds" .) }}
{{- $drainDelay := int (include "agent-server.drainDelay" .) }}
{{- $shutdown := int (include "agent-server.shutdownTimeout" .) }}
{{- $window := int .Values.config.drainWindow }}
{{- if le $shutdown (add $drainDelay $window) }}
{{- $errors = append $errors (printf "SHUTDOWN_TIMEOUT (%d s) must exceed DRAIN_DELAY (%d s) + config.drainWindow (%d s): raise terminationGracePeriodSeconds or config.shutdownTimeout, or lower config.drainWindow" $shutdown $drainDelay $window) }}
{{- end }}
{{- if ge (add $preStop $shutdown) $grace }}
{{- $errors = append $errors (printf "the preStop sleep (%d s) + SHUTDOWN_TIMEOUT (%d s) must be shorter than terminationGracePeriodSeconds (%d s), or the kubelet kills the server mid-drain" $preStop $shutdown $grace) }}
{{- end }}
{{- range $name, $ca := dict "externalDatabase.tls.ca" .Values.externalDatabase.tls.ca "externalRedis.tls.ca" .Values.externalRedis.tls.ca }}
{{- if and $ca.secretName $ca.configMapName }}
{{- $errors = append $errors (printf "%s: give secretName or configMapName, not both" $name) }}
{{- end }}
{{- end }}
{{- if and (not .Values.externalRedis.tls.enabled) (or .Values.externalRedis.tls.ca.secretName .Values.externalRedis.tls.ca.configMapName) }}
{{- $errors = append $errors "externalRedis.tls.ca is set but externalRedis.tls.enabled is false: enable TLS, or drop the CA" }}
{{- end }}
{{- $svc := .Values.service }}
{{- if and (ne $svc.type "LoadBalancer") (or $svc.loadBalancerSourceRanges $svc.loadBalancerClass) }}
{{- $errors = append $errors "service.loadBalancerSourceRanges and service.loadBalancerClass need service.type=LoadBalancer" }}
{{- end }}
{{- if and (eq $svc.type "ClusterIP") (or $svc.externalTrafficPolicy (not (kindIs "invalid" $svc.nodePort))) }}
{{- $errors = append $errors "service.externalTrafficPolicy and service.nodePort need service.type=LoadBalancer or NodePort" }}
{{- end }}
{{- if eq (int .Values.metrics.port) (int .Values.config.serverPort) }}
{{- $errors = append $errors "metrics.port must differ from config.serverPort: /metrics is served only on its own port, which no Ingress or HTTPRoute routes" }}
{{- end }}
{{- if and .Values.gatewayApi.enabled (not .Values.gatewayApi.parentRefs) }}
{{- $errors = append $errors "gatewayApi.parentRefs must name at least one Gateway" }}
{{- end }}
{{- range $key := list "MAX_INVENTORY_BYTES" "MAX_BINARY_BYTES" }}
{{- if hasKey $.Values.config.extra $key }}
{{- $errors = append $errors (printf "config.extra.%s: set routes.%s.bodySize instead, so that the ingress and the server keep one limit" $key (ternary "inventory" "binaries" (eq $key "MAX_INVENTORY_BYTES"))) }}
{{- end }}
{{- end }}
{{- $heartbeat := toString .Values.config.wsHeartbeatInterval }}
{{- if and (regexMatch "^[0-9]+s?$" $heartbeat) (ge (int (trimSuffix "s" $heartbeat)) (int .Values.routes.websocket.timeout)) }}
{{- $errors = append $errors (printf "routes.websocket.timeout (%v s) must exceed config.wsHeartbeatInterval (%s): the server's pings are what keep idle agents connected through the ingress" .Values.routes.websocket.timeout $heartbeat) }}
{{- end }}
{{- if and .Values.auth.existingSecret .Values.auth.secretKey }}
{{- $errors = append $errors "auth.secretKey is not used with auth.existingSecret: put SECRET_KEY in that Secret" }}
{{- end }}
{{- if $errors }}
{{- fail (printf "\n\nagent-server chart: invalid values:\n  - %s\n" (join "\n  - " $errors)) }}
{{- end }}
{{- end }}

{{/* storageClassName of a claim: empty leaves the cluster default, `-` asks for none. */}}
{{- define "agent-server.storageClass" -}}
{{- if eq . "-" }}
storageClassName: ""
{{- else if . }}
storageClassName: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
A Kubernetes quantity ("500m", "2", 1.5, "512Mi", "1e3") as a plain number
in base units, so that requests and limits can be compared.
*/}}
{{- define "agent-server.quantity" -}}
{{- $text := toString . }}
{{- $number := regexFind "^[+]?[0-9]*[.]?[0-9]+" $text | trimPrefix "+" }}
{{- $suffix := trimPrefix $number (trimPrefix "+" $text) }}
{{- $factors := dict "" 1.0 "m" 0.001 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 }}
{{- $factor := 1.0 }}
{{- if hasKey $factors $suffix }}
{{- $factor = get $factors $suffix }}
{{- else if regexMatch "^[eE][0-9]+$" $suffix }}
{{- range until (int (trimPrefix "e" (lower $suffix))) }}{{ $factor = mulf $factor 10 }}{{ end }}
{{- end }}
{{- mulf (float64 $number) $factor }}
{{- end }}

{{/*
The least number of server pods that run: the HPA's minimum, or replicaCount.
*/}}
{{- define "agent-server.minReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ int .Values.autoscaling.minReplicas }}{{ else }}{{ int .Values.replicaCount }}{{ end }}
{{- end }}

{{/*
Why the PodDisruptionBudget could never allow an eviction (empty when it can).
Kubernetes rounds both percentages up. Such a budget blocks `kubectl drain`
and node autoscalers forever, without a word, so it is refused.
*/}}
{{- define "agent-server.pdbProblem" -}}
{{- $replicas := int (include "agent-server.minReplicas" .) }}
{{- if and .Values.pdb.enabled (gt $replicas 0) }}
{{- $min := toString .Values.pdb.minAvailable }}
{{- if ne $min "" }}
{{- $needed := int $min }}
{{- if hasSuffix "%" $min }}
{{- $needed = int (ceil (divf (mulf (float64 (trimSuffix "%" $min)) $replicas) 100)) }}
{{- end }}
{{- if ge $needed $replicas }}
{{- printf "pdb.minAvailable=%s keeps all %d server pod(s) up, so no eviction is ever allowed and `kubectl drain` and node autoscalers block forever: use pdb.maxUnavailable=1 (and pdb.minAvailable=\"\"), or run more replicas than minAvailable (autoscaling.minReplicas with an HPA)" $min $replicas }}
{{- end }}
{{- else }}
{{- $max := toString .Values.pdb.maxUnavailable }}
{{- $allowed := int $max }}
{{- if hasSuffix "%" $max }}
{{- $allowed = int (ceil (divf (mulf (float64 (trimSuffix "%" $max)) $replicas) 100)) }}
{{- end }}
{{- if lt $allowed 1 }}
{{- printf "pdb.maxUnavailable=%s allows no eviction at all, so `kubectl drain` and node autoscalers block forever: use 1 or more" $max }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Host names of the Ingress, as a JSON list: ingress.host first, then ingress.extraHosts. */}}
{{- define "agent-server.ingress.hosts" -}}
{{- prepend .Values.ingress.extraHosts .Values.ingress.host | uniq | toJson }}
{{- end }}

{{/*
Namespaces whose pods may reach the server's HTTP port: the ingress
controller's (networkPolicy.ingressNamespaces) and, with an HTTPRoute, those of
the Gateways it attaches to (a parentRef without a namespace means the
release's). JSON list.
*/}}
{{- define "agent-server.networkPolicy.ingressNamespaces" -}}
{{- $names := .Values.networkPolicy.ingressNamespaces | default list }}
{{- if .Values.gatewayApi.enabled }}
{{- range .Values.gatewayApi.parentRefs }}
{{- $names = append $names (default $.Release.Namespace .namespace) }}
{{- end }}
{{- end }}
{{- $names | uniq | toJson }}
{{- end }}

{{/*
Sources a LoadBalancer or NodePort Service delivers traffic from, as
NetworkPolicy peers (JSON list; empty for ClusterIP). With
externalTrafficPolicy Local clients keep their addresses, so the
loadBalancerSourceRanges (else everyone) are admitted; with Cluster the
source is translated to node addresses, which no value names, so everyone is.
*/}}
{{- define "agent-server.networkPolicy.serviceSources" -}}
{{- $svc := .Values.service }}
{{- $peers := list }}
{{- if has $svc.type (list "LoadBalancer" "NodePort") }}
{{- $ranges := list "0.0.0.0/0" "::/0" }}
{{- if and (eq $svc.externalTrafficPolicy "Local") (eq $svc.type "LoadBalancer") $svc.loadBalancerSourceRanges }}
{{- $ranges = $svc.loadBalancerSourceRanges }}
{{- end }}
{{- range $ranges }}
{{- $peers = append $peers (dict "ipBlock" (dict "cidr" .)) }}
{{- end }}
{{- end }}
{{- $peers | toJson }}
{{- end }}

{{/*
TLS material of the external PostgreSQL and Redis, mounted from Secrets or
ConfigMaps: a list of {name, mountPath, sources (projected volume sources),
env (variable -> file path)}, as JSON. libpq reads PGSSLROOTCERT, PGSSLCERT
and PGSSLKEY from the environment; the server reads REDIS_TLS_CA_FILE.
*/}}
{{- define "agent-server.tlsMounts" -}}
{{- $mounts := list }}
{{- if not .Values.postgresql.enabled }}
{{- $tls := .Values.externalDatabase.tls }}
{{- $dir := "/etc/agent-server/postgresql-tls" }}
{{- $sources := list }}
{{- $env := dict }}
{{- with $tls.ca }}
{{- if .secretName }}
{{- $sources = append $sources (dict "secret" (dict "name" .secretName "items" (list (dict "key" .key "path" "ca.crt")))) }}
{{- else if .configMapName }}
{{- $sources = append $sources (dict "configMap" (dict "name" .configMapName "items" (list (dict "key" .key "path" "ca.crt")))) }}
{{- end }}
{{- if or .secretName .configMapName }}
{{- $_ := set $env "PGSSLROOTCERT" (printf "%s/ca.crt" $dir) }}
{{- end }}
{{- end }}
{{- with $tls.clientCertificate }}
{{- if .secretName }}
{{- $sources = append $sources (dict "secret" (dict "name" .secretName "items" (list (dict "key" .certKey "path" "client.crt") (dict "key" .keyKey "path" "client.key")))) }}
{{- $_ := set $env "PGSSLCERT" (printf "%s/client.crt" $dir) }}
{{- $_ := set $env "PGSSLKEY" (printf "%s/client.key" $dir) }}
{{- end }}
{{- end }}
{{- if $sources }}
{{- $mounts = append $mounts (dict "name" "postgresql-tls" "mountPath" $dir "sources" $sources "env" $env) }}
{{- end }}
{{- end }}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.tls.enabled }}
{{- with .Values.externalRedis.tls.ca }}
{{- $dir := "/etc/agent-server/redis-tls" }}
{{- if .secretName }}
{{- $mounts = append $mounts (dict "name" "redis-tls" "mountPath" $dir "sources" (list (dict "secret" (dict "name" .secretName "items" (list (dict "key" .key "path" "ca.crt"))))) "env" (dict "REDIS_TLS_CA_FILE" (printf "%s/ca.crt" $dir))) }}
{{- else if .configMapName }}
{{- $mounts = append $mounts (dict "name" "redis-tls" "mountPath" $dir "sources" (list (dict "configMap" (dict "name" .configMapName "items" (list (dict "key" .key "path" "ca.crt"))))) "env" (dict "REDIS_TLS_CA_FILE" (printf "%s/ca.crt" $dir))) }}
{{- end }}
{{- end }}
{{- end }}
{{- $mounts | toJson }}
{{- end }}

{{/*
Secrets the chart would have to make up, because no value and no Secret gives
them: a JSON list of {what, how} (how: the values that would give it).
*/}}
{{- define "agent-server.secretsToGenerate" -}}
{{- $missing := list }}
{{- $v := .Values }}
{{- if and (not $v.auth.existingSecret) (not $v.auth.secretKey) (not $v.secretFiles.secretKey) }}
{{- $missing = append $missing (dict "what" "SECRET_KEY" "how" "auth.existingSecret (key SECRET_KEY), auth.secretKey or secretFiles.secretKey") }}
{{- end }}
{{- if and (not $v.auth.existingSecret) (not $v.auth.adminPassword) (not $v.secretFiles.adminPassword) (ne (toString $v.secrets.generate) "false") }}
{{- $missing = append $missing (dict "what" "ADMIN_PASSWORD" "how" "auth.existingSecret (key ADMIN_PASSWORD), auth.adminPassword or secretFiles.adminPassword; with secrets.generate=false and none of them, web UI sign-in is disabled") }}
{{- end }}
{{- if and $v.postgresql.enabled (not $v.postgresql.auth.existingSecret) (not $v.postgresql.auth.password) }}
{{- $missing = append $missing (dict "what" "the bundled PostgreSQL password" "how" "postgresql.auth.existingSecret or postgresql.auth.password") }}
{{- end }}
{{- if and $v.redis.enabled $v.redis.auth.enabled (not $v.redis.auth.existingSecret) (not $v.redis.auth.password) }}
{{- $missing = append $missing (dict "what" "the bundled Redis password" "how" "redis.auth.existingSecret or redis.auth.password") }}
{{- end }}
{{- $missing | toJson }}
{{- end }}

{{/*
True when this render has a cluster behind it: `lookup` lists the release
namespace's Secrets (Helm itself keeps its release records there). Under
`helm template`, Argo CD or a client-side dry run it returns nothing.
*/}}
{{- define "agent-server.renderedAgainstCluster" -}}
{{- if lookup "v1" "Secret" .Release.Namespace "" }}true{{ end }}
{{- end }}

{{/* Whether this render may generate the secrets nobody gave; fails when it must not. */}}
{{- define "agent-server.checkSecretGeneration" -}}
{{- $missing := include "agent-server.secretsToGenerate" . | fromJsonArray }}
{{- $mode := toString .Values.secrets.generate }}
{{- if $missing }}
{{- $lines := list }}
{{- range $missing }}
{{- $lines = append $lines (printf "%s: set %s" .what .how) }}
{{- end }}
{{- if eq $mode "false" }}
{{- fail (printf "\n\nagent-server chart: secrets.generate=false, but nothing gives:\n  - %s\n(see \"Secrets and GitOps\" in the chart's README)\n" (join "\n  - " $lines)) }}
{{- else if and (eq $mode "auto") (or .Release.IsInstall .Release.IsUpgrade) (not (include "agent-server.renderedAgainstCluster" .)) }}
{{- fail (printf "\n\nagent-server chart: rendered without a cluster (helm template, Argo CD, a client-side dry run), so the secrets below would be generated anew on every render: each sync would change the keys that sign tokens and the database passwords, and break them. Give them instead (then set secrets.generate=false):\n  - %s\nor set secrets.generate=true to render random ones anyway (inspection, CI, a one-off apply). See \"Secrets and GitOps\" in the chart's README.\n" (join "\n  - " $lines)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
secretFiles.mount: the secret settings the server reads from files, as a JSON
list of {env (the *_FILE variable), file (name under the mount), name (Secret),
key, optional}. Settings whose file the operator mounts (secretFiles.<x>) are
not in it.
*/}}
{{- define "agent-server.secretFileItems" -}}
{{- $items := list }}
{{- if .Values.secretFiles.mount }}
{{- $own := include "agent-server.secretName" . }}
{{- $byUser := not (empty .Values.auth.existingSecret) }}
{{- if not .Values.secretFiles.secretKey }}
{{- $items = append $items (dict "env" "SECRET_KEY_FILE" "file" "secret-key" "name" $own "key" "SECRET_KEY" "optional" false) }}
{{- end }}
{{- if and (not .Values.secretFiles.adminPassword) (or $byUser .Values.auth.adminPassword (ne (toString .Values.secrets.generate) "false")) }}
{{- $items = append $items (dict "env" "ADMIN_PASSWORD_FILE" "file" "admin-password" "name" $own "key" "ADMIN_PASSWORD" "optional" $byUser) }}
{{- end }}
{{- $dbMode := include "agent-server.database.mode" . }}
{{- if eq $dbMode "externalUrl" }}
{{- $items = append $items (dict "env" "DATABASE_URL_FILE" "file" "database-url" "name" $own "key" "DATABASE_URL" "optional" false) }}
{{- else if eq $dbMode "secretUrl" }}
{{- $items = append $items (dict "env" "DATABASE_URL_FILE" "file" "database-url" "name" .Values.externalDatabase.existingSecret "key" .Values.externalDatabase.existingSecretUrlKey "optional" false) }}
{{- else if eq $dbMode "user" }}
{{- $items = append $items (dict "env" "DATABASE_URL_FILE" "file" "database-url" "name" $own "key" "DATABASE_URL" "optional" false) }}
{{- end }}
{{- $redisMode := include "agent-server.redis.passwordMode" . }}
{{- if eq $redisMode "env" }}
{{- $ref := include "agent-server.redis.passwordRef" . | fromYaml }}
{{- $items = append $items (dict "env" "REDIS_PASSWORD_FILE" "file" "redis-password" "name" $ref.name "key" $ref.key "optional" false) }}
{{- else if eq $redisMode "user" }}
{{- $items = append $items (dict "env" "REDIS_PASSWORD_FILE" "file" "redis-password" "name" $own "key" "REDIS_PASSWORD" "optional" true) }}
{{- else if and (eq $redisMode "inline") (include "agent-server.redis.host" .) (or (not .Values.redis.enabled) .Values.redis.auth.enabled) }}
{{- $items = append $items (dict "env" "REDIS_PASSWORD_FILE" "file" "redis-password" "name" $own "key" "REDIS_PASSWORD" "optional" false) }}
{{- end }}
{{- end }}
{{- $items | toJson }}
{{- end }}

{{/*
The routes of `routes`, in the order an Ingress or HTTPRoute lists them, as a
JSON list of {name, paths}. The paths are the server's own (server/src/http/mod.rs):
an Ingress path is a prefix, so `inventory` covers all of `/api/v1/agents`.
*/}}
{{- define "agent-server.routes" -}}
{{- list (dict "name" "websocket" "paths" (list "/ws")) (dict "name" "inventory" "paths" (list "/api/v1/agents")) (dict "name" "binaries" "paths" (list "/api/v1/binaries")) (dict "name" "default" "paths" (list "/api" "/")) | toJson }}
{{- end }}

{{/* A `routes.*.bodySize` ("10Mi", "64Ki", "1048576") in bytes. */}}
{{- define "agent-server.bytes" -}}
{{- $text := toString . }}
{{- $number := regexFind "^[0-9]+" $text }}
{{- $factor := get (dict "" 1 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824) (trimPrefix $number $text) }}
{{- mul (int64 $number) (int64 $factor) }}
{{- end }}

{{/* The same size in nginx's syntax ("10m", "64k", "1048576"), which reads k/m/g as powers of 1024. */}}
{{- define "agent-server.nginxSize" -}}
{{- $text := toString . }}
{{- $number := regexFind "^[0-9]+" $text }}
{{- $number }}{{ get (dict "" "" "Ki" "k" "Mi" "m" "Gi" "g") (trimPrefix $number $text) }}
{{- end }}
