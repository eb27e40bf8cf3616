{{/* Names and labels shared by every template. */}}
{{- define "mmpipe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mmpipe.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "mmpipe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mmpipe.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "mmpipe.labels" -}}
{{ include "mmpipe.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: mmpipe
{{- end -}}

{{- define "mmpipe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mmpipe.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The mmpipe image: "repository:tag" (tag defaults to the chart's appVersion). */}}
{{- define "mmpipe.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* mmpipe settings of a component: the global `settings` with the
     component's own `settings` merged over them, key by key. */}}
{{- define "mmpipe.settings" -}}
{{- $merged := mergeOverwrite (deepCopy (default dict .root.Values.settings)) (deepCopy (default dict .component.settings)) -}}
{{- toYaml $merged -}}
{{- end -}}

{{/* Pod-level scheduling for a component: GPU placement when it asks for GPUs.
     Args: root, gpus (int). */}}
{{- define "mmpipe.scheduling" -}}
{{- $v := .root.Values -}}
{{- $gpu := gt (int .gpus) 0 -}}
{{- $nodeSelector := $v.nodeSelector -}}
{{- $tolerations := $v.tolerations -}}
{{- if $gpu -}}
{{- $nodeSelector = mergeOverwrite (deepCopy (default dict $v.nodeSelector)) (deepCopy (default dict $v.gpu.nodeSelector)) -}}
{{- $tolerations = concat (default list $v.tolerations) (default list $v.gpu.tolerations) -}}
{{- end -}}
{{- if and $gpu $v.gpu.runtimeClassName }}
runtimeClassName: {{ $v.gpu.runtimeClassName }}
{{- end }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Container resources with the GPU resource added. Args: root, resources, gpus. */}}
{{- define "mmpipe.resources" -}}
{{- $res := deepCopy (default dict .resources) -}}
{{- if gt (int .gpus) 0 -}}
{{- $limits := default dict $res.limits -}}
{{- $_ := set $limits .root.Values.gpu.resourceName (int .gpus) -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* Environment shared by mmpipe containers: secrets by reference only. */}}
{{- define "mmpipe.secretEnv" -}}
{{- $v := .Values -}}
{{- with $v.objectStorage.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: {{ $v.objectStorage.accessKeyIdKey }}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: {{ $v.objectStorage.secretAccessKeyKey }}}
{{- end }}
{{- with $v.objectStorage.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with $v.objectStorage.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with ($v.privacy).idHashKeySecret }}
- name: MMPIPE_ID_HASH_KEY
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: {{ $v.privacy.idHashKeyKey }}}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes every mmpipe pod mounts: writable /tmp (the root filesystem is
     read-only), the model packages, and optionally the settings ConfigMap. */}}
{{- define "mmpipe.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .root.Values.tmpSizeLimit }}
{{- with .root.Values.models.volume }}
- name: models
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .settingsConfigMap }}
- name: settings
  configMap:
    name: {{ .settingsConfigMap }}
{{- end }}
{{- end -}}

{{- define "mmpipe.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .root.Values.models.volume }}
- name: models
  mountPath: {{ .root.Values.models.mountPath }}
  readOnly: true
{{- end }}
{{- if .settingsConfigMap }}
- name: settings
  mountPath: /etc/mmpipe
  readOnly: true
{{- end }}
{{- end -}}

{{/* A Ray pod template (KubeRay head or worker group).
     Args: root, role (head|worker), component, resources, gpus. */}}
{{- define "mmpipe.rayPodTemplate" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "mmpipe.labels" (dict "root" $root "component" .component) | nindent 4 }}
    mmpipe.io/ray-role: {{ .role }}
spec:
  serviceAccountName: {{ include "mmpipe.serviceAccountName" $root }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- include "mmpipe.scheduling" (dict "root" $root "gpus" .gpus) | nindent 2 }}
  containers:
    - name: ray-{{ .role }}
      image: {{ include "mmpipe.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      ports:
        {{- if eq .role "head" }}
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        {{- end }}
        - {name: serve, containerPort: 8000}
        - {name: metrics, containerPort: 8080}
      env:
        - name: HOME
          value: /tmp
        - name: RAY_USAGE_STATS_ENABLED
          value: "0"
        {{- include "mmpipe.secretEnv" $root | nindent 8 }}
      resources:
        {{- include "mmpipe.resources" (dict "root" $root "resources" .resources "gpus" .gpus) | nindent 8 }}
      volumeMounts:
        {{- include "mmpipe.volumeMounts" (dict "root" $root "settingsConfigMap" .settingsConfigMap) | nindent 8 }}
  volumes:
    {{- include "mmpipe.volumes" (dict "root" $root "settingsConfigMap" .settingsConfigMap) | nindent 4 }}
{{- end -}}

{{/* Ingress sources allowed to reach metrics ports. */}}
{{- define "mmpipe.monitoringPeer" -}}
- namespaceSelector:
    {{- toYaml .Values.networkPolicy.monitoringNamespaceSelector | nindent 4 }}
{{- end -}}

{{/* rayStartParams as KubeRay wants them (string values), num-gpus added for GPU pods. */}}
{{- define "mmpipe.rayStartParams" -}}
{{- $out := dict -}}
{{- range $k, $v := (default dict .params) -}}
{{- $_ := set $out $k (toString $v) -}}
{{- end -}}
{{- if gt (int .gpus) 0 -}}
{{- $_ := set $out "num-gpus" (toString .gpus) -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}
