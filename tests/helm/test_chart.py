"""Offline checks of the Helm chart and of the plain manifests generated from it.

No Kubernetes cluster runs on this machine, and no helm binary: the chart is
linted and rendered by Helm's own Go engine through PyPI's helm-python-sdk,
and every object is checked against the Kubernetes OpenAPI schemas of one
release with kubernetes-validate. Nothing here installs a release or talks to
an API server, so `lookup` (which keeps the release Secret's token across
upgrades) sees nothing and is not exercised.

Run with scripts/check-chart.sh.
"""

from __future__ import annotations

import base64
import difflib
import importlib.util
import pathlib
import re
import shutil

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "flotilla"
MANIFESTS = ROOT / "manifests" / "kubernetes"
# A recent release that kind and minikube ship and kubernetes-validate has schemas for.
KUBE_VERSION = "1.35.0"
POD_VERBS = ["get", "list", "watch", "create", "delete"]
# The release's Lease <release>-owner: read, created, renewed.
LEASE_VERBS = ["get", "create", "update"]
# The workers' credential Secrets: written and deleted, never read back.
SECRET_VERBS = ["create", "patch", "delete"]

_spec = importlib.util.spec_from_file_location("render_manifests", ROOT / "charts" / "render-manifests.py")
render_manifests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_manifests)

# The least a render needs: the chart never makes up a token.
TOKEN = {"auth": {"token": "render-token-0123456789"}}

# Non-default values: every list and optional setting differs from values.yaml.
CUSTOM = {
    "image": {"worker": {"repository": "registry.local/flotilla-worker", "tag": "dev", "pullPolicy": "Never"}},
    "workers": [{"capacity": 3}, {"capacity": 4, "replicas": 2}, {"capacity": 5}],
    "workerResources": {"cpuPerCapacity": 0.5, "memory": "1Gi"},
    "heartbeat": {"intervalSeconds": 2, "timeoutSeconds": 7},
    "maxAttempts": 5,
    "auth": {"token": "test-token-0123456789abcdef"},
    "telemetry": {"otlpEndpoint": "http://jaeger-collector:4318"},
    "sharedResources": [
        {"name": "total", "type": "Integer", "initialValue": 0},
        {"name": "numbers", "type": "List", "initialValue": [1, 2, 3]},
        {"name": "label", "type": "String", "initialValue": "007"},
        {"name": "config", "type": "Dictionary", "initialValue": {"mode": "fast", "depth": 2}},
    ],
    "service": {"type": "ClusterIP", "port": 8080},
}

# Every optional object and setting on, on top of CUSTOM.
FULL = {
    **CUSTOM,
    "telemetry": {"otlpEndpoint": "http://jaeger-collector:4318", "workerOtlpEndpoint": "https://otel.example:4319",
                  "serviceName": "flotilla-test", "sampleRatio": 0.25},
    "imagePullSecrets": [{"name": "regcred"}],
    "serviceAccount": {"create": True, "name": "flotilla-master", "annotations": {"example.com/role": "flotilla"}},
    "workerPods": {
        "nodeSelector": {"pool": "batch"},
        "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["batch"]}]}]}}},
        "env": [{"name": "DATA_DIR", "value": "/data"}],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data", "readOnly": True}}],
        "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
    },
    "metrics": {"enabled": True, "port": 9100,
                "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prometheus"}}},
    "ingress": {"enabled": True, "className": "nginx", "host": "flotilla.example.com",
                "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "60"},
                "tls": {"secretName": "flotilla-tls"}},
    "networkPolicy": {
        "enabled": True,
        "apiFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}],
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
    },
    "extraEnv": [{"name": "RUST_LOG", "value": "debug"}],
    "extraVolumes": [{"name": "ca", "configMap": {"name": "ca-bundle"}}],
    "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/ssl/extra", "readOnly": True}],
}


def merged(base, extra):
    out = dict(base)
    for key, value in (extra or {}).items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def render_all(values=None, release="demo", namespace="jobs", chart_dir=CHART, token=True):
    """Every rendered object, in order, and NOTES. `token`: add TOKEN under the values."""
    values = merged(TOKEN, values) if token else values
    with helm.Chart.load(chart_dir) as chart:
        rendered = chart.render(values, name=release, namespace=namespace)
    objects = []
    for source, text in sorted(rendered.items()):
        if source.endswith("NOTES.txt"):
            continue
        objects.extend(obj for obj in yaml.safe_load_all(text) if obj)
    notes = rendered.get("flotilla/templates/NOTES.txt", "")
    return objects, notes


def render(values=None, release="demo", namespace="jobs", chart_dir=CHART, token=True):
    """Rendered objects by kind (NetworkPolicies by name), and NOTES."""
    listed, notes = render_all(values, release, namespace, chart_dir, token)
    objects = {}
    for obj in listed:
        key = obj["kind"] if obj["kind"] != "NetworkPolicy" else f"NetworkPolicy/{obj['metadata']['name']}"
        assert key not in objects, f"two {key} objects"
        objects[key] = obj
    return objects, notes


def master_container(objects):
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.fixture(scope="module", params=["default", "custom", "full"])
def case(request):
    values = {"default": None, "custom": CUSTOM, "full": FULL}[request.param]
    objects, notes = render(values)
    return request.param, values, objects, notes


def test_schema_validation_bites():
    # A guard on the guard: strict validation must reject an unknown field.
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"prots": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("values", [None, CUSTOM, FULL], ids=["default", "custom", "full"])
def test_lint_is_clean(values):
    report = helm.lint(CHART, merged(TOKEN, values), strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # Severity 1 is info ("icon is recommended"); warnings and errors are not accepted.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


BASE_KINDS = [
    "ConfigMap", "Deployment", "PersistentVolumeClaim", "Role", "RoleBinding", "Secret", "Service", "ServiceAccount",
]
OPTIONAL_KINDS = ["Ingress", "NetworkPolicy/demo-master", "NetworkPolicy/demo-workers", "ServiceMonitor"]


def test_every_rendered_object_validates(case):
    name, _, objects, _ = case
    expected = BASE_KINDS + (OPTIONAL_KINDS if name == "full" else [])
    assert sorted(objects) == sorted(expected)
    for obj in objects.values():
        if obj["kind"] == "ServiceMonitor":
            # A Prometheus Operator CRD: no schema in kubernetes-validate; its shape is checked below.
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_role_grants_exactly_the_pod_lease_and_secret_verbs_the_runtime_uses(case):
    _, _, objects, _ = case
    assert objects["Role"]["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": POD_VERBS},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": LEASE_VERBS},
        {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": SECRET_VERBS},
    ]
    binding = objects["RoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": objects["Role"]["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": objects["ServiceAccount"]["metadata"]["name"], "namespace": "jobs"}
    ]
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]


def test_master_deployment(case):
    name, values, objects, _ = case
    deployment = objects["Deployment"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = master_container(objects)
    assert container["image"] == "flotilla-master:0.1.0"
    # No `command`: the image's entrypoint (tini -- flotilla) stays, and receives these.
    assert "command" not in container
    metrics_port = 9464 if name != "full" else 9100
    assert container["args"] == [
        "up", "/etc/flotilla/cluster.yaml", "--bind", "0.0.0.0", "--port", "5000", "--runtime", "kubernetes",
        "--state-dir", "/var/lib/flotilla/state", "--metrics-port", str(metrics_port),
    ]
    # The durable state on the release's claim (Recreate: one pod mounts it at a time).
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["state"] == "/var/lib/flotilla/state"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claim = objects["PersistentVolumeClaim"]
    assert volumes["state"]["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"]}
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    # The non-root master can write the claim's files.
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["fsGroup"] == pod_security["runAsGroup"]

    env = env_of(container)
    assert env["FLOTILLA_TOKEN"] == {"secretKeyRef": {"name": objects["Secret"]["metadata"]["name"], "key": "token"}}
    assert env["FLOTILLA_RELEASE"] == "demo"
    assert env["FLOTILLA_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["FLOTILLA_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["FLOTILLA_POD_UID"] == {"fieldRef": {"fieldPath": "metadata.uid"}}
    port = 5000 if values is None else values["service"]["port"]
    assert env["FLOTILLA_ADVERTISE_URL"] == f"http://demo:{port}"
    if name == "default":
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env
    else:
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger-collector:4318"
    assert env["OTEL_SERVICE_NAME"] == ("flotilla-test" if name == "full" else "flotilla-master")
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["ports"] == [
        {"name": "http", "containerPort": 5000, "protocol": "TCP"},
        {"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"},
    ]
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}

    service = objects["Service"]["spec"]
    assert service["type"] == "ClusterIP"
    assert service["ports"] == [
        {"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"},
        {"name": "metrics", "port": metrics_port, "targetPort": "metrics", "protocol": "TCP"},
    ]
    # The Service and the Deployment select the master pod only, never a worker pod.
    assert service["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["selector"]["app.kubernetes.io/component"] == "master"


def test_default_cluster_manifest_is_the_native_form():
    objects, _ = render()
    manifest = yaml.safe_load(objects["ConfigMap"]["data"]["cluster.yaml"])
    assert manifest == {
        "apiVersion": "flotilla.dev/v1",
        "kind": "Cluster",
        "metadata": {"name": "demo"},
        "spec": {
            "runtime": "kubernetes",
            "image": "flotilla-worker:0.1.0",
            "imagePullPolicy": "IfNotPresent",
            "workerResources": {"cpuPerCapacity": 0.25, "memory": "512Mi"},
            "heartbeat": {"intervalSeconds": 5, "timeoutSeconds": 10},
            "maxAttempts": 3,
            "workers": [{"capacity": 4, "replicas": 2}],
            "resources": [],
        },
    }
    mount, tmp, _state = master_container(objects)["volumeMounts"]
    assert mount["mountPath"] == "/etc/flotilla"
    assert tmp["mountPath"] == "/tmp"
    volume, tmp_volume, _state = objects["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert volume == {"name": mount["name"], "configMap": {"name": objects["ConfigMap"]["metadata"]["name"]}}
    assert tmp_volume == {"name": tmp["name"], "emptyDir": {"sizeLimit": "64Mi"}}


def test_custom_cluster_manifest_carries_the_values():
    objects, _ = render(CUSTOM)
    spec = yaml.safe_load(objects["ConfigMap"]["data"]["cluster.yaml"])["spec"]
    assert spec["workers"] == [
        {"capacity": 3, "replicas": 1}, {"capacity": 4, "replicas": 2}, {"capacity": 5, "replicas": 1},
    ]
    assert spec["image"] == "registry.local/flotilla-worker:dev"
    assert spec["imagePullPolicy"] == "Never"
    assert spec["workerResources"] == {"cpuPerCapacity": 0.5, "memory": "1Gi"}
    assert spec["heartbeat"] == {"intervalSeconds": 2, "timeoutSeconds": 7}
    assert spec["maxAttempts"] == 5
    # The YAML loader must see the types the values had: "007" stays a string.
    assert spec["resources"] == CUSTOM["sharedResources"]
    # values.yaml's sampleRatio (1: every task) goes into the manifest.
    assert spec["telemetry"] == {"otlpEndpoint": "http://jaeger-collector:4318", "sampleRatio": 1}


def test_full_cluster_manifest_carries_worker_pod_settings():
    objects, _ = render(FULL)
    spec = yaml.safe_load(objects["ConfigMap"]["data"]["cluster.yaml"])["spec"]
    assert spec["telemetry"] == {
        "otlpEndpoint": "http://jaeger-collector:4318", "workerOtlpEndpoint": "https://otel.example:4319",
        "sampleRatio": 0.25,
    }
    pods = dict(FULL["workerPods"])
    assert spec["workerPods"] == {**pods, "imagePullSecrets": [{"name": "regcred"}]}
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "flotilla-master"
    assert objects["ServiceAccount"]["metadata"]["annotations"] == {"example.com/role": "flotilla"}
    container = master_container(objects)
    assert env_of(container)["RUST_LOG"] == "debug"
    assert container["volumeMounts"][-1] == {"name": "ca", "mountPath": "/etc/ssl/extra", "readOnly": True}
    assert pod["volumes"][-1] == {"name": "ca", "configMap": {"name": "ca-bundle"}}


def checksums(objects):
    annotations = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    return annotations["checksum/config"], annotations["checksum/token"]


def test_config_change_restarts_the_master():
    assert checksums(render()[0])[0] != checksums(render({"workers": [{"capacity": 4}]})[0])[0]


def test_token_change_restarts_the_master():
    config, token = checksums(render()[0])
    config2, token2 = checksums(render({"auth": {"token": "another-token-987654321"}})[0])
    assert config == config2 and token != token2
    # The annotation is a hash, never the token itself.
    objects, _ = render()
    assert TOKEN["auth"]["token"] not in yaml.safe_dump(objects["Deployment"])
    # Naming another existing Secret rolls it too.
    named = lambda secret: checksums(render({"auth": {"token": "", "existingSecret": secret}})[0])[1]
    assert named("one") != named("two") != token


@pytest.mark.parametrize("values", [None, CUSTOM, FULL], ids=["default", "custom", "full"])
def test_two_renders_are_the_same(values):
    # helm template and GitOps tools render offline: the same values, the same objects.
    assert render_all(values) == render_all(values)
    assert render_all({**(values or {}), "auth": {"token": "", "existingSecret": "mine"}}) == render_all(
        {**(values or {}), "auth": {"token": "", "existingSecret": "mine"}})


def test_no_token_fails_saying_how_to_make_one():
    with pytest.raises(helm.HelmRenderError) as failure:
        render(token=False)
    message = str(failure.value)
    assert "auth.token or auth.existingSecret is required" in message
    assert "openssl rand -hex 24" in message


def test_token_secret():
    given, _ = render(CUSTOM)
    assert base64.b64decode(given["Secret"]["data"]["token"]).decode() == CUSTOM["auth"]["token"]

    existing, _ = render({"auth": {"token": "", "existingSecret": "my-token"}})
    assert "Secret" not in existing
    assert env_of(master_container(existing))["FLOTILLA_TOKEN"] == {"secretKeyRef": {"name": "my-token", "key": "token"}}


def test_service_account_can_be_brought():
    objects, _ = render({"serviceAccount": {"create": False, "name": "ops-made"}})
    assert "ServiceAccount" not in objects
    assert objects["Deployment"]["spec"]["template"]["spec"]["serviceAccountName"] == "ops-made"
    assert objects["RoleBinding"]["subjects"][0]["name"] == "ops-made"


# ----- the "restricted" Pod Security Standard ---------------------------------
# https://kubernetes.io/docs/concepts/security/pod-security-standards/ — the
# checks of the baseline and restricted levels that a pod template can fail.

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}


def restricted_violations(pod):
    """What the restricted level refuses in a PodSpec (empty: admitted)."""
    bad = []
    psc = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            bad.append(f"{key} is true")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            bad.append(f"volume {volume['name']} is of type {sorted(kinds)}")
    for sysctl in psc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            bad.append(f"sysctl {sysctl['name']}")
    if psc.get("seLinuxOptions", {}).get("type") not in (None, "", "container_t", "container_init_t",
                                                          "container_kvm_t", "container_engine_t"):
        bad.append("pod seLinuxOptions.type")
    if psc.get("runAsUser") == 0:
        bad.append("pod runAsUser is 0")
    containers = pod.get("initContainers", []) + pod["containers"] + pod.get("ephemeralContainers", [])
    for c in containers:
        sc = c.get("securityContext", {})
        name = c["name"]
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation is not false")
        if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
            bad.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            bad.append(f"{name}: runAsUser is 0")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile is {seccomp}")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            bad.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: capabilities add {caps['add']}")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{name}: procMount")
        for port in c.get("ports", []):
            if port.get("hostPort"):
                bad.append(f"{name}: hostPort {port['hostPort']}")
        if sc.get("appArmorProfile", {}).get("type") == "Unconfined":
            bad.append(f"{name}: appArmor Unconfined")
    return bad


def test_the_restricted_check_bites():
    # A guard on the guard: a pod as the chart had it (root, no seccomp) is refused.
    pod = {"containers": [{"name": "c", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}],
           "volumes": [{"name": "docker", "hostPath": {"path": "/var/run/docker.sock"}}]}
    bad = restricted_violations(pod)
    for text in ("allowPrivilegeEscalation", "runAsNonRoot", "seccompProfile", "drop ALL", "SYS_ADMIN", "hostPath"):
        assert any(text in b for b in bad), (text, bad)


def test_master_pod_meets_the_restricted_level(case):
    _, _, objects, _ = case
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    # And more than the level asks: a read-only root filesystem and a non-root uid.
    container = master_container(objects)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsUser"] == 10001


def test_network_policies():
    objects, _ = render(FULL)
    master_labels = objects["Deployment"]["spec"]["selector"]["matchLabels"]
    workers = objects["NetworkPolicy/demo-workers"]["spec"]
    worker_labels = dict(master_labels, **{"app.kubernetes.io/component": "worker"})
    assert workers["podSelector"] == {"matchLabels": worker_labels}
    assert workers["policyTypes"] == ["Ingress", "Egress"]
    assert workers["ingress"] == []
    to_master, dns, otlp = workers["egress"]
    assert to_master == {"to": [{"podSelector": {"matchLabels": master_labels}}],
                         "ports": [{"port": 5000, "protocol": "TCP"}]}
    assert dns == {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    assert otlp == {"ports": [{"port": 4318, "protocol": "TCP"}, {"port": 4319, "protocol": "TCP"}]}

    master = objects["NetworkPolicy/demo-master"]["spec"]
    assert master["podSelector"] == {"matchLabels": master_labels}
    api, metrics = master["ingress"]
    assert api["from"] == [{"podSelector": {"matchLabels": worker_labels}}] + FULL["networkPolicy"]["apiFrom"]
    assert api["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert metrics == {"from": FULL["networkPolicy"]["metricsFrom"], "ports": [{"port": "metrics", "protocol": "TCP"}]}


def test_ingress_and_service_monitor():
    objects, _ = render(FULL)
    ingress = objects["Ingress"]["spec"]
    assert ingress["ingressClassName"] == "nginx"
    assert ingress["tls"] == [{"hosts": ["flotilla.example.com"], "secretName": "flotilla-tls"}]
    (rule,) = ingress["rules"]
    assert rule["host"] == "flotilla.example.com"
    assert rule["http"]["paths"][0]["backend"] == {"service": {"name": "demo", "port": {"name": "http"}}}
    monitor = objects["ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"] == {"matchLabels": objects["Service"]["spec"]["selector"]}
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    # Without TLS the Ingress has no tls section.
    plain, _ = render({"ingress": {"enabled": True, "host": "a.example"}})
    assert "tls" not in plain["Ingress"]["spec"]


def test_notes_say_how_to_reach_the_api():
    _, notes = render(CUSTOM)
    assert "kubectl port-forward --namespace jobs svc/demo 5000:8080" in notes
    assert "kubectl get secret --namespace jobs demo -o jsonpath='{.data.token}' | base64 -d" in notes
    assert 'Authorization: Bearer $FLOTILLA_TOKEN' in notes


BAD_VALUES = {
    "capacity 0": ({"workers": [{"capacity": 4}, {"capacity": 0}]}, ["/workers/1/capacity", "minimum: got 0, want 1"]),
    "empty image": ({"image": {"worker": {"repository": ""}}}, ["/image/worker/repository", "minLength: got 0, want 1"]),
    "runtime nomad": ({"runtime": "nomad"}, ["/runtime", "value must be 'kubernetes'"]),
    "replicas 0": ({"workers": [{"capacity": 4, "replicas": 0}]}, ["/workers/0/replicas", "minimum: got 0, want 1"]),
}


@pytest.mark.parametrize("values, expected", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_fail_naming_the_value(values, expected):
    with pytest.raises(helm.HelmValuesError) as failure:
        render(values)
    for text in expected:
        assert text in str(failure.value)


TEMPLATE_CHECKS = {
    "capacity 0": ({"workers": [{"capacity": 4}, {"capacity": 0}]}, "workers[1].capacity is 0"),
    "empty image": ({"image": {"master": {"repository": ""}}}, "image.master.repository is empty"),
    "runtime nomad": ({"runtime": "nomad"}, 'runtime "nomad" is not supported'),
    "replicas 0": ({"workers": [{"capacity": 4, "replicas": 0}]}, "workers[0].replicas is 0"),
    "ingress without host": ({"ingress": {"enabled": True}}, "ingress.enabled needs ingress.host"),
}


@pytest.mark.parametrize("values, expected", TEMPLATE_CHECKS.values(), ids=TEMPLATE_CHECKS.keys())
def test_bad_values_fail_without_the_schema_too(values, expected, tmp_path):
    # `helm install --skip-schema-validation` must not let them through: the
    # templates fail on their own. Rendered from a copy without the schema.
    chart = shutil.copytree(CHART, tmp_path / "flotilla", ignore=shutil.ignore_patterns("values.schema.json"))
    with pytest.raises(helm.HelmRenderError, match=re.escape(expected)):
        render(values, chart_dir=chart)


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"heartbeat": {"intervalSeconds": 5, "timeoutSeconds": 5}},
         "heartbeat.timeoutSeconds (5) must be greater than heartbeat.intervalSeconds (5)"),
        ({"sharedResources": [{"name": "total", "type": "Integer", "initialValue": 0}] * 2},
         'sharedResources: the name "total" is used twice'),
    ],
    ids=["heartbeat", "duplicate resource"],
)
def test_rules_the_schema_cannot_express_fail_in_templates(values, expected):
    with pytest.raises(helm.HelmRenderError, match=re.escape(expected)):
        render(values)


def plain_documents():
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            if obj:
                yield path, obj


def test_plain_manifests_validate():
    kinds = []
    for path, obj in plain_documents():
        if obj["kind"] == "Deployment":
            assert restricted_violations(obj["spec"]["template"]["spec"]) == []
        if obj["kind"] == "Kustomization":
            # kubernetes-validate has no schema for kustomize's own file: check its shape.
            assert obj["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
            assert set(obj) == {"apiVersion", "kind", "resources"}
            assert all((MANIFESTS / name).is_file() for name in obj["resources"])
            continue
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        kinds.append(obj["kind"])
    # The token Secret is left out on purpose (see render-manifests.py).
    assert kinds == ["ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Role", "RoleBinding", "Service", "Deployment"]


def test_plain_manifests_match_a_fresh_render():
    expected = render_manifests.render(CHART)
    assert sorted(path.name for path in MANIFESTS.iterdir()) == sorted(expected)
    for name, text in expected.items():
        current = (MANIFESTS / name).read_text()
        diff = "".join(difflib.unified_diff(
            current.splitlines(True), text.splitlines(True), f"manifests/kubernetes/{name}", "fresh render"))
        assert not diff, f"stale: run .venv-chart/bin/python charts/render-manifests.py\n{diff}"


def test_without_persistence_the_state_is_on_an_empty_dir():
    objects, _ = render({"persistence": {"enabled": False}})
    assert "PersistentVolumeClaim" not in objects
    volumes = {v["name"]: v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["state"] == {"name": "state", "emptyDir": {}}
    # A storage class and size reach the claim.
    objects, _ = render({"persistence": {"storageClass": "fast", "size": "5Gi"}})
    claim = objects["PersistentVolumeClaim"]["spec"]
    assert claim["storageClassName"] == "fast"
    assert claim["resources"]["requests"]["storage"] == "5Gi"
