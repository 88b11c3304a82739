{{/* Names ------------------------------------------------------------------- */}}

{{- define "inferstack.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "inferstack.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-worker-<pool>": the pool's Deployment. Args: (dict "root" $ "pool" $pool) */}}
{{- define "inferstack.poolName" -}}
{{- printf "%s-worker-%s" (include "inferstack.fullname" .root) .pool.name -}}
{{- end -}}

{{- define "inferstack.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "inferstack.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels: (dict "root" $ "component" "api") */}}
{{- define "inferstack.selectorLabels" -}}
app.kubernetes.io/name: {{ include "inferstack.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "inferstack.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{ include "inferstack.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: inferstack
{{- end -}}

{{- define "inferstack.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Secrets --------------------------------------------------------------------
   The chart's own Secret holds whatever secret values were given; each consumer
   reads either it or the Secret the operator named. */}}

{{- define "inferstack.secretName" -}}
{{- include "inferstack.fullname" . -}}
{{- end -}}

{{- define "inferstack.redisUrlRef" -}}
name: {{ .Values.redis.existingSecret | default (include "inferstack.secretName" .) }}
key: {{ ternary .Values.redis.existingSecretKey "redis-url" (ne .Values.redis.existingSecret "") }}
{{- end -}}

{{/* Whether media jobs (rq) have a Redis of their own. */}}
{{- define "inferstack.hasRqRedis" -}}
{{- if or .Values.redis.rq.url .Values.redis.rq.existingSecret -}}true{{- end -}}
{{- end -}}

{{- define "inferstack.rqRedisUrlRef" -}}
name: {{ .Values.redis.rq.existingSecret | default (include "inferstack.secretName" .) }}
key: {{ ternary .Values.redis.rq.existingSecretKey "rq-redis-url" (ne .Values.redis.rq.existingSecret "") }}
{{- end -}}

{{- define "inferstack.hasClickhouse" -}}
{{- if or .Values.clickhouse.bundled.enabled .Values.clickhouse.url .Values.clickhouse.existingSecret -}}true{{- end -}}
{{- end -}}

{{- define "inferstack.clickhouseUrlRef" -}}
name: {{ .Values.clickhouse.existingSecret | default (include "inferstack.secretName" .) }}
key: {{ ternary .Values.clickhouse.existingSecretKey "clickhouse-url" (ne .Values.clickhouse.existingSecret "") }}
{{- end -}}

{{- define "inferstack.authSecretName" -}}
{{- .Values.auth.existingSecret | default (include "inferstack.secretName" .) -}}
{{- end -}}

{{/* The key of the keys file in the auth Secret; empty in open mode. */}}
{{- define "inferstack.keysFileKey" -}}
{{- if .Values.auth.existingSecret -}}{{ .Values.auth.existingSecretKeys.keysFile }}
{{- else if .Values.auth.keys -}}keys.toml
{{- end -}}
{{- end -}}

{{/* The key of the admin key in the auth Secret; empty when there is none. */}}
{{- define "inferstack.adminKeyKey" -}}
{{- if .Values.auth.existingSecret -}}{{ .Values.auth.existingSecretKeys.adminKey }}
{{- else if .Values.auth.adminKey -}}admin-key
{{- end -}}
{{- end -}}

{{/* Checks that need more than the values schema. */}}
{{- define "inferstack.validate" -}}
{{- $redis := 0 -}}
{{- if .Values.redis.bundled.enabled -}}{{- $redis = add1 $redis -}}{{- end -}}
{{- if .Values.redis.url -}}{{- $redis = add1 $redis -}}{{- end -}}
{{- if .Values.redis.existingSecret -}}{{- $redis = add1 $redis -}}{{- end -}}
{{- if ne $redis 1 -}}
{{- fail "redis: set exactly one of redis.bundled.enabled, redis.url or redis.existingSecret" -}}
{{- end -}}
{{- if and .Values.redis.bundled.enabled (ne .Values.redis.mode "standalone") -}}
{{- fail (printf "redis.mode %s needs an external Redis (redis.url or redis.existingSecret): the bundled one is standalone" .Values.redis.mode) -}}
{{- end -}}
{{- if and .Values.redis.rq.url .Values.redis.rq.existingSecret -}}
{{- fail "redis.rq: set at most one of redis.rq.url or redis.rq.existingSecret" -}}
{{- end -}}
{{- if and (eq .Values.redis.mode "cluster") (not (include "inferstack.hasRqRedis" .)) -}}
{{- range $name, $spec := (include "inferstack.registry" . | fromJson) -}}
{{- if has (get $spec "modality") (list "image" "video") -}}
{{- fail (printf "models.registry has the media model %q, whose jobs (rq) cannot run on a Redis Cluster (redis.mode cluster): set redis.rq.url or redis.rq.existingSecret to a standalone or Sentinel-managed Redis" $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $ch := 0 -}}
{{- if .Values.clickhouse.bundled.enabled -}}{{- $ch = add1 $ch -}}{{- end -}}
{{- if .Values.clickhouse.url -}}{{- $ch = add1 $ch -}}{{- end -}}
{{- if .Values.clickhouse.existingSecret -}}{{- $ch = add1 $ch -}}{{- end -}}
{{- if gt $ch 1 -}}
{{- fail "clickhouse: set at most one of clickhouse.bundled.enabled, clickhouse.url or clickhouse.existingSecret" -}}
{{- end -}}
{{- if and .Values.clickhouse.bundled.enabled (not .Values.clickhouse.bundled.password) -}}
{{- fail "clickhouse.bundled.password is required when clickhouse.bundled.enabled is true" -}}
{{- end -}}
{{- if and .Values.api.autoscaling.enabled (not (dig "requests" "cpu" "" .Values.api.resources)) -}}
{{- fail "api.autoscaling scales on CPU utilization: set api.resources.requests.cpu" -}}
{{- end -}}
{{- if and (include "inferstack.keysFileKey" .) (not (include "inferstack.adminKeyKey" .)) -}}
{{- fail "auth.keys (keyed mode) needs an admin key (auth.adminKey, or auth.existingSecret with existingSecretKeys.adminKey): /ready needs a key, and the readiness probe sends that one" -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.apiBearerToken (not (include "inferstack.adminKeyKey" .)) -}}
{{- fail "metrics.serviceMonitor.apiBearerToken needs an admin key (auth.adminKey, or auth.existingSecret with existingSecretKeys.adminKey)" -}}
{{- end -}}
{{- $registry := (include "inferstack.registry" . | fromJson) -}}
{{- $names := dict -}}
{{- range $pool := include "inferstack.pools" . | fromJsonArray -}}
{{- if hasKey $names $pool.name -}}
{{- fail (printf "workers.pools: the pool name %q is used twice" $pool.name) -}}
{{- end -}}
{{- $_ := set $names $pool.name true -}}
{{- if not $.Values.models.existingConfigMap -}}
{{- range $model := concat $pool.models (without $pool.serves "*") -}}
{{- if not (hasKey $registry $model) -}}
{{- fail (printf "workers.pools[%s]: the model %q is not in models.registry (it has: %s)" $pool.name $model (keys $registry | sortAlpha | join ", ")) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Worker pools: each pool over poolDefaults, merged two levels deep (a pool's
   `autoscaling: {maxReplicas: 8}` keeps the other autoscaling defaults). A JSON list. */}}
{{- define "inferstack.pools" -}}
{{- $out := list -}}
{{- range $p := .Values.workers.pools -}}
{{- $m := deepCopy $.Values.workers.poolDefaults -}}
{{- range $k, $v := $p -}}
{{- if and (kindIs "map" $v) (kindIs "map" (get $m $k)) -}}
{{- $sub := deepCopy (get $m $k) -}}
{{- range $k2, $v2 := $v -}}{{- $_ := set $sub $k2 $v2 -}}{{- end -}}
{{- $_ := set $m $k $sub -}}
{{- else -}}
{{- $_ := set $m $k $v -}}
{{- end -}}
{{- end -}}
{{- $out = append $out $m -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* Models ----------------------------------------------------------------------- */}}

{{/* The registry's [models] table as JSON ({} with an existing ConfigMap: not readable here). */}}
{{- define "inferstack.registry" -}}
{{- if .Values.models.existingConfigMap -}}
{}
{{- else -}}
{{- $parsed := fromToml .Values.models.registry -}}
{{- if hasKey $parsed "Error" -}}
{{- fail (printf "models.registry is not valid TOML: %s" (get $parsed "Error")) -}}
{{- end -}}
{{- get $parsed "models" | default dict | toJson -}}
{{- end -}}
{{- end -}}

{{/* Text and vision models of the registry: the ones the API needs tokenizers for. */}}
{{- define "inferstack.tokenizerModels" -}}
{{- $out := list -}}
{{- range $name, $spec := (include "inferstack.registry" . | fromJson) -}}
{{- if has (get $spec "modality") (list "text" "vision") -}}
{{- $out = append $out $name -}}
{{- end -}}
{{- end -}}
{{- $out | sortAlpha | join " " -}}
{{- end -}}

{{- define "inferstack.modelsConfigMap" -}}
{{- .Values.models.existingConfigMap | default (printf "%s-models" (include "inferstack.fullname" .)) -}}
{{- end -}}

{{/* Pod pieces shared by the API, the workers and the exporter ---------------------- */}}

{{/* Environment every Inference Stack container gets. */}}
{{- define "inferstack.commonEnv" -}}
- name: INFERSTACK_REDIS_URL
  valueFrom:
    secretKeyRef:
      {{- include "inferstack.redisUrlRef" . | nindent 6 }}
- name: INFERSTACK_REDIS_MODE
  value: {{ .Values.redis.mode | quote }}
{{- if eq .Values.redis.mode "sentinel" }}
- name: INFERSTACK_REDIS_SENTINEL_MASTER
  value: {{ .Values.redis.sentinelMaster | quote }}
{{- end }}
{{- if include "inferstack.hasRqRedis" . }}
- name: INFERSTACK_RQ_REDIS_URL
  valueFrom:
    secretKeyRef:
      {{- include "inferstack.rqRedisUrlRef" . | nindent 6 }}
- name: INFERSTACK_RQ_REDIS_MODE
  value: {{ .Values.redis.rq.mode | quote }}
{{- if eq .Values.redis.rq.mode "sentinel" }}
- name: INFERSTACK_RQ_SENTINEL_MASTER
  value: {{ .Values.redis.rq.sentinelMaster | default .Values.redis.sentinelMaster | quote }}
{{- end }}
{{- end }}
- name: INFERSTACK_MODELS_FILE
  value: /etc/inferstack/models/models.toml
- name: INFERSTACK_CACHE_DIR
  value: {{ .Values.models.storage.mountPath | quote }}
- name: HF_HOME
  value: {{ printf "%s/huggingface" .Values.models.storage.mountPath | quote }}
- name: HF_HUB_OFFLINE
  value: "1"
- name: HOME
  value: /tmp
{{- range $name, $value := .Values.env }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{/* Where request rows are: the exporter writes them, the API's /v1/stats reads them. */}}
{{- define "inferstack.storeEnv" -}}
{{- if include "inferstack.hasClickhouse" . }}
- name: INFERSTACK_CLICKHOUSE_URL
  valueFrom:
    secretKeyRef:
      {{- include "inferstack.clickhouseUrlRef" . | nindent 6 }}
{{- end }}
- name: INFERSTACK_CLICKHOUSE_DATABASE
  value: {{ .Values.clickhouse.database | quote }}
{{- end -}}

{{/* A component's own env map, rendered after the common one (a later entry wins). */}}
{{- define "inferstack.extraEnv" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{- define "inferstack.commonVolumeMounts" -}}
- name: models-registry
  mountPath: /etc/inferstack/models
  readOnly: true
- name: model-store
  mountPath: {{ .Values.models.storage.mountPath }}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "inferstack.commonVolumes" -}}
- name: models-registry
  configMap:
    name: {{ include "inferstack.modelsConfigMap" . }}
- name: model-store
  {{- $s := .Values.models.storage }}
  {{- if eq $s.type "persistentVolumeClaim" }}
  persistentVolumeClaim:
    claimName: {{ $s.persistentVolumeClaim.existingClaim | default (printf "%s-models" (include "inferstack.fullname" .)) }}
    readOnly: {{ $s.persistentVolumeClaim.readOnly }}
  {{- else if eq $s.type "hostPath" }}
  hostPath:
    path: {{ $s.hostPath.path }}
    type: {{ $s.hostPath.type }}
  {{- else }}
  emptyDir:
    {{- toYaml $s.emptyDir | nindent 4 }}
  {{- end }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{/* Roll the pods when the registry or a secret value changes. */}}
{{- define "inferstack.checksums" -}}
checksum/models: {{ .Values.models.registry | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end -}}

{{- define "inferstack.scrapeAnnotations" -}}
{{- if .root.Values.metrics.podAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end -}}
{{- end -}}

{{/* Autoscaling ------------------------------------------------------------------- */}}

{{/* Label matchers every series of the query carries (the release's namespace). */}}
{{- define "inferstack.promMatchers" -}}
{{- with .Values.keda.prometheus.namespaceLabel -}}
{{- printf ", %s=`%s`" . $.Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* A pool's PromQL load: requests waiting for its models, once each however many
   exporters report them (max by model and tier), plus the sequences its own pods
   run. Args: (dict "root" $ "pool" $pool) */}}
{{- define "inferstack.poolQuery" -}}
{{- $a := .pool.autoscaling -}}
{{- if $a.query -}}
{{- $a.query -}}
{{- else -}}
{{- $models := list -}}
{{- range concat .pool.models .pool.serves -}}
{{- $models = append $models (regexQuoteMeta .) -}}
{{- end -}}
{{- $re := ternary ".+" ($models | uniq | join "|") (has "*" .pool.serves) -}}
{{- $sel := printf "model=~`%s`%s" $re (include "inferstack.promMatchers" .root) -}}
{{- $q := printf "sum(max by (model, tier) (inferstack_queue_depth{%s}))" $sel -}}
{{- if $a.countRunning -}}
{{- $podSel := "" -}}
{{- with .root.Values.keda.prometheus.podLabel -}}
{{- $podSel = printf ", %s=~`%s-[a-z0-9]+-[a-z0-9]+`" . (include "inferstack.poolName" $) -}}
{{- end -}}
{{- $q = printf "%s + (sum(inferstack_batch_size{%s%s}) or vector(0))" $q $sel $podSel -}}
{{- end -}}
{{- $q -}}
{{- end -}}
{{- end -}}
