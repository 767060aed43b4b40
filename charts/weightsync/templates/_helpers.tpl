{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "weightsync.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "weightsync.fullname" -}}
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

{{- define "weightsync.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "weightsync.labels" -}}
helm.sh/chart: {{ include "weightsync.chart" . }}
{{ include "weightsync.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "weightsync.selectorLabels" -}}
app.kubernetes.io/name: {{ include "weightsync.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "weightsync.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "weightsync.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "weightsync.claimName" -}}
{{- default (printf "%s-models" (include "weightsync.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{- define "weightsync.secretName" -}}
{{- if .Values.credentials.existingSecret }}
{{- .Values.credentials.existingSecret }}
{{- else if .Values.credentials.create }}
{{- printf "%s-credentials" (include "weightsync.fullname" .) }}
{{- end }}
{{- end }}

{{- define "weightsync.modelDir" -}}
{{- printf "%s/%s/current" (trimSuffix "/" .Values.persistence.mountPath) .Values.weightsync.name }}
{{- end }}

{{/* "true" with weightsync.layout=hf-cache: the volume holds a Hugging Face hub cache the server loads by repo id. */}}
{{- define "weightsync.hfCache" -}}
{{- if eq (default "native" .Values.weightsync.layout) "hf-cache" }}true{{ end -}}
{{- end }}

{{/* weightsync's --dest: the mount itself, or with hf-cache its hub/ directory (HF_HUB_CACHE), which keeps the
cache apart from anything else at the volume's root (ext4's lost+found would be reported as a broken repo). */}}
{{- define "weightsync.dest" -}}
{{- if include "weightsync.hfCache" . }}
{{- printf "%s/hub" (trimSuffix "/" .Values.persistence.mountPath) }}
{{- else }}
{{- .Values.persistence.mountPath }}
{{- end }}
{{- end }}

{{/* hf-cache: the repo id the model is cached under and the server loads: weightsync.repoId, else the hf:// source's. */}}
{{- define "weightsync.repoId" -}}
{{- $w := .Values.weightsync -}}
{{- if $w.repoId -}}
{{- $w.repoId -}}
{{- else if hasPrefix "hf://" $w.source -}}
{{- $repo := trimPrefix "models/" (trimAll "/" (trimPrefix "hf://" $w.source)) -}}
{{- if hasPrefix "datasets/" $repo -}}
{{- fail "weightsync.layout=hf-cache: a dataset (hf://datasets/...) is cached as datasets--OWNER--NAME, which no model server loads; use weightsync.layout=native" -}}
{{- end -}}
{{- first (splitList "@" $repo) -}}
{{- else -}}
{{- fail "weightsync.layout=hf-cache needs weightsync.repoId (OWNER/NAME) for an s3:// or file:// source: the repo id the model is cached under and the server loads it by" -}}
{{- end -}}
{{- end }}

{{/* hf-cache: the revision the server asks the cache for (MODEL_REVISION). A branch or tag has a ref, and a commit
is its own snapshot name: for hf://, the revision synced (weightsync.revision, the source's @rev, or the
lockfile's commit), else main; s3:// and file:// revisions are cached under refs/main. */}}
{{- define "weightsync.modelRevision" -}}
{{- $w := .Values.weightsync -}}
{{- $revision := "" -}}
{{- if hasPrefix "hf://" $w.source -}}
{{- $revision = $w.revision -}}
{{- if and (not $revision) (contains "@" $w.source) -}}
{{- $revision = last (splitList "@" $w.source) -}}
{{- end -}}
{{- if and (not $revision) $w.lockfile -}}
{{- $revision = toString (default "" (fromJson $w.lockfile).revision) -}}
{{- end -}}
{{- end -}}
{{- default "main" $revision -}}
{{- end }}

{{/* The name clients ask the server for (MODEL_NAME): the repo id with hf-cache, else weightsync.name. */}}
{{- define "weightsync.modelName" -}}
{{- if include "weightsync.hfCache" . }}{{ include "weightsync.repoId" . }}{{ else }}{{ .Values.weightsync.name }}{{ end -}}
{{- end }}

{{/* A server probe from values: the Probe as given, or with no handler an HTTP GET of server.healthPath on the http port. */}}
{{- define "weightsync.serverProbe" -}}
{{- $probe := deepCopy .probe -}}
{{- if not (or $probe.httpGet $probe.tcpSocket $probe.exec $probe.grpc) -}}
{{- $_ := set $probe "httpGet" (dict "path" .healthPath "port" "http") -}}
{{- end -}}
{{- toYaml $probe -}}
{{- end }}

{{- define "weightsync.image" -}}
{{- printf "%s:%s" .repository (toString .tag) }}
{{- end }}

{{/* The weightsync container; initContainer or native sidecar by weightsync.mode. */}}
{{- define "weightsync.agentContainer" -}}
{{- $w := .Values.weightsync -}}
{{- $sidecar := eq $w.mode "sidecar" -}}
- name: weightsync
  image: {{ include "weightsync.image" $w.image | quote }}
  imagePullPolicy: {{ $w.image.pullPolicy }}
  {{- if $sidecar }}
  restartPolicy: Always
  {{- end }}
  args:
    - {{ ternary "serve" "sync" $sidecar }}
    - --source={{ $w.source }}
    - --dest={{ include "weightsync.dest" . }}
    {{- if not (include "weightsync.hfCache" .) }}
    - --name={{ $w.name }}
    {{- end }}
    {{- with $w.revision }}
    - --revision={{ . }}
    {{- end }}
    {{- range $w.fallback }}
    - --fallback={{ . }}
    {{- end }}
    {{- range $w.include }}
    - --include={{ . }}
    {{- end }}
    {{- range $w.exclude }}
    - --exclude={{ . }}
    {{- end }}
    - --verify={{ $w.verify }}
    {{- if $w.requireChecksum }}
    - --require-checksum
    {{- end }}
    {{- if $w.rebind }}
    - --rebind
    {{- end }}
    - --concurrency={{ $w.concurrency }}
    - --lock-timeout={{ $w.lockTimeout }}
    {{- if $w.lockfile }}
    - --lockfile=/etc/weightsync/weightsync.lock
    {{- end }}
    {{- with $w.s3.addressingStyle }}
    - --s3-addressing-style={{ . }}
    {{- end }}
    {{- if $w.offline }}
    - --offline
    {{- end }}
    {{- if .Values.metrics.textfile.enabled }}
    - --metrics-textfile=/var/lib/weightsync-metrics/weightsync-{{ include "weightsync.fullname" . }}.prom
    {{- end }}
    {{- with .Values.metrics.pushgateway.url }}
    - --pushgateway={{ . }}
    {{- end }}
    {{- if $sidecar }}
    - --metrics-port={{ .Values.metrics.port }}
    - --recheck-interval={{ $w.sidecar.recheckInterval }}
    {{- if .Values.gpu.enabled }}
    - --require-gpu
    {{- end }}
    {{- end }}
    {{- range $w.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  env:
    {{- with $w.s3.endpoint }}
    - name: AWS_ENDPOINT_URL
      value: {{ . | quote }}
    {{- end }}
    {{- with $w.s3.region }}
    - name: AWS_REGION
      value: {{ . | quote }}
    {{- end }}
    {{- with $w.hf.endpoint }}
    - name: HF_ENDPOINT
      value: {{ . | quote }}
    {{- end }}
    {{- if $w.oci.configSecret }}
    - name: DOCKER_CONFIG
      value: /etc/weightsync-registry
    {{- end }}
    - name: WEIGHTSYNC_LOG_FORMAT
      value: json
    {{- if include "weightsync.hfCache" . }}
    - name: WEIGHTSYNC_LAYOUT
      value: hf-cache
    - name: WEIGHTSYNC_REPO_ID
      value: {{ include "weightsync.repoId" . | quote }}
    {{- end }}
    {{- if .Values.signature.required }}
    {{- $t := .Values.signature.trust }}
    - name: WEIGHTSYNC_SIGNATURE
      value: {{ ternary "auto" (include "weightsync.trustPath" (dict "file" .Values.signature.file "mountPath" $t.mountPath)) (eq .Values.signature.file "auto") | quote }}
    {{- range $field, $name := dict "key" "WEIGHTSYNC_TRUST_KEY" "certificate" "WEIGHTSYNC_TRUST_CERTIFICATE" "root" "WEIGHTSYNC_TRUST_ROOT" }}
    {{- with index $t $field }}
    - name: {{ $name }}
      value: {{ include "weightsync.trustPath" (dict "file" . "mountPath" $t.mountPath) | quote }}
    {{- end }}
    {{- end }}
    {{- with $t.identity }}
    - name: WEIGHTSYNC_TRUST_IDENTITY
      value: {{ . | quote }}
    {{- end }}
    {{- with $t.issuer }}
    - name: WEIGHTSYNC_TRUST_ISSUER
      value: {{ . | quote }}
    {{- end }}
    {{- with .Values.signature.ignore }}
    - name: WEIGHTSYNC_SIGNATURE_IGNORE
      value: {{ join "," . | quote }}
    {{- end }}
    {{- end }}
    {{- with $w.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with (include "weightsync.secretName" .) }}
  envFrom:
    - secretRef:
        name: {{ . }}
  {{- end }}
  {{- if $sidecar }}
  ports:
    - name: metrics
      containerPort: {{ .Values.metrics.port }}
  startupProbe:
    httpGet: {path: /readyz, port: metrics}
    periodSeconds: 5
    failureThreshold: {{ $w.sidecar.startupFailureThreshold }}
  readinessProbe:
    httpGet: {path: /readyz, port: metrics}
    periodSeconds: 10
  livenessProbe:
    httpGet: {path: /healthz, port: metrics}
    periodSeconds: 20
  {{- end }}
  volumeMounts:
    - name: models
      mountPath: {{ .Values.persistence.mountPath }}
    - name: tmp
      mountPath: /tmp
    {{- if $w.lockfile }}
    - name: lockfile
      mountPath: /etc/weightsync
      readOnly: true
    {{- end }}
    {{- if .Values.metrics.textfile.enabled }}
    - name: metrics-textfile
      mountPath: /var/lib/weightsync-metrics
    {{- end }}
    {{- if $w.oci.configSecret }}
    - name: registry-auth
      mountPath: /etc/weightsync-registry
      readOnly: true
    {{- end }}
    {{- if include "weightsync.trustVolume" . }}
    - name: signature-trust
      mountPath: {{ .Values.signature.trust.mountPath }}
      readOnly: true
    {{- end }}
    {{- with $w.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  resources:
    {{- toYaml $w.resources | nindent 4 }}
  terminationMessagePolicy: FallbackToLogsOnError
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
{{- end }}

{{/*
The requests `helm test` sends, as JSON: tests.requests, or what fits the configured server (its health path,
and the example server's one prediction when the server is the example image).
*/}}
{{- define "weightsync.testRequests" -}}
{{- $requests := .Values.tests.requests -}}
{{- if not $requests -}}
{{- $requests = list (dict "method" "GET" "path" .Values.server.healthPath) -}}
{{- if hasSuffix "weightsync-example" .Values.server.image.repository -}}
{{- $requests = append $requests (dict "method" "POST" "path" "/v1/predict" "expectKey" "outputs"
      "body" "{\"inputs\": [[0.5, -1, 2, 0, 1.5, -0.25, 3, -2]]}") -}}
{{- end -}}
{{- end -}}
{{- toJson $requests -}}
{{- end -}}

{{/* A trust file of signature.trust (or signature.file): an absolute path as given, a file name inside signature.trust.mountPath. */}}
{{- define "weightsync.trustPath" -}}
{{- if hasPrefix "/" .file -}}
{{- .file -}}
{{- else -}}
{{- printf "%s/%s" (trimSuffix "/" .mountPath) .file -}}
{{- end -}}
{{- end }}

{{/* The volume holding the trust material: "secret", "configMap", or "" (none). */}}
{{- define "weightsync.trustVolume" -}}
{{- $t := .Values.signature.trust -}}
{{- if .Values.signature.required -}}
{{- if $t.secretName }}secret{{ else if $t.configMapName }}configMap{{ end -}}
{{- end -}}
{{- end }}

{{/* Refuse a signature policy weightsync would refuse (exit 2) or a pod Kubernetes would: fail at render time instead. */}}
{{- define "weightsync.checkSignature" -}}
{{- $s := .Values.signature -}}
{{- $t := $s.trust -}}
{{- if $s.required -}}
{{- if and $t.key (or $t.certificate $t.issuer) -}}
{{- fail "signature.trust.key and signature.trust.certificate / signature.trust.issuer are two trust policies; give one" -}}
{{- end -}}
{{- if and $t.key $t.identity -}}
{{- fail "signature.trust.identity does not apply to a key (signature.trust.key): a key signature names no identity; use signature.trust.certificate or issuer with it, or drop it" -}}
{{- end -}}
{{- if and $t.issuer (not $t.identity) -}}
{{- fail "signature.trust.issuer needs signature.trust.identity (the sigstore signer's email or URI)" -}}
{{- end -}}
{{- if not (or $t.key $t.certificate (and $t.identity $t.issuer)) -}}
{{- fail "signature.required=true needs whom to trust: signature.trust.key (a public key), signature.trust.certificate (a CA certificate), or signature.trust.identity with signature.trust.issuer (sigstore keyless)" -}}
{{- end -}}
{{- if and $t.secretName $t.configMapName -}}
{{- fail "signature.trust.secretName and signature.trust.configMapName: give one (the trust material is mounted from it)" -}}
{{- end -}}
{{- $files := list -}}
{{- range $field := list "key" "certificate" "root" -}}
{{- $value := index $t $field -}}
{{- if and $value (not (hasPrefix "/" $value)) -}}
{{- $files = append $files (printf "signature.trust.%s=%s" $field $value) -}}
{{- end -}}
{{- end -}}
{{- if and (ne $s.file "auto") (not (hasPrefix "/" $s.file)) -}}
{{- $files = append $files (printf "signature.file=%s" $s.file) -}}
{{- end -}}
{{- if and $files (not (or $t.secretName $t.configMapName)) -}}
{{- fail (printf "%s names a file in the trust Secret or ConfigMap: set signature.trust.secretName or signature.trust.configMapName (or give an absolute path, mounted through extraVolumes and weightsync.extraVolumeMounts)" (join ", " $files)) -}}
{{- end -}}
{{- if and (include "weightsync.trustVolume" .) .Values.weightsync.lockfile (eq (trimSuffix "/" $t.mountPath) "/etc/weightsync") -}}
{{- fail "signature.trust.mountPath /etc/weightsync is where weightsync.lockfile is mounted: use another path (the default is /etc/weightsync/trust)" -}}
{{- end -}}
{{- if and (include "weightsync.trustVolume" .) (eq (trimSuffix "/" $t.mountPath) (trimSuffix "/" .Values.persistence.mountPath)) -}}
{{- fail "signature.trust.mountPath must differ from persistence.mountPath" -}}
{{- end -}}
{{- end -}}
{{- end }}
