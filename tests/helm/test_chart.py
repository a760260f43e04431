"""Offline checks of the Helm chart and of the plain manifests generated from it.

No Kubernetes cluster runs on this machine, and no helm binary: the chart is
linted and rendered by Helm's own Go engine through PyPI's helm-python-sdk,
and every object is checked against the Kubernetes OpenAPI schemas of one
release with kubernetes-validate. Nothing here installs a release or talks to
an API server, so `lookup` (which keeps a generated token across upgrades)
sees nothing and is not exercised.

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

_spec = importlib.util.spec_from_file_location("render_manifests", ROOT / "charts" / "render-manifests.py")
render_manifests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_manifests)

# Non-default values: every list and optional setting differs from values.yaml.
CUSTOM = {
    "image": {"worker": {"repository": "registry.local/flotilla-worker", "tag": "dev", "pullPolicy": "Never"}},
    "workers": [{"capacity": 3}, {"capacity": 4}, {"capacity": 5}],
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


def render(values=None, release="demo", namespace="jobs", chart_dir=CHART):
    """Rendered objects by kind (one object of each kind in this chart), and NOTES."""
    with helm.Chart.load(chart_dir) as chart:
        rendered = chart.render(values, name=release, namespace=namespace)
    objects = {}
    for source, text in rendered.items():
        if source.endswith("NOTES.txt"):
            continue
        for obj in yaml.safe_load_all(text):
            if obj:
                assert obj["kind"] not in objects, f"two {obj['kind']} objects"
                objects[obj["kind"]] = obj
    notes = rendered.get("flotilla/templates/NOTES.txt", "")
    return objects, notes


def master_container(objects):
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.fixture(scope="module", params=["default", "custom"])
def case(request):
    values = None if request.param == "default" else CUSTOM
    objects, notes = render(values)
    return request.param, values, objects, notes


def test_schema_validation_bites():
    # A guard on the guard: strict validation must reject an unknown field.
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"prots": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("values", [None, CUSTOM], ids=["default", "custom"])
def test_lint_is_clean(values):
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # Severity 1 is info ("icon is recommended"); warnings and errors are not accepted.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_every_rendered_object_validates(case):
    _, _, objects, _ = case
    assert sorted(objects) == sorted(
        ["ConfigMap", "Deployment", "Role", "RoleBinding", "Secret", "Service", "ServiceAccount"]
    )
    for obj in objects.values():
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_role_grants_exactly_the_pod_verbs_the_runtime_uses(case):
    _, _, objects, _ = case
    assert objects["Role"]["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": POD_VERBS}]
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
    assert container["args"] == [
        "up", "/etc/flotilla/cluster.yaml", "--bind", "0.0.0.0", "--port", "5000", "--runtime", "kubernetes",
    ]
    env = env_of(container)
    assert env["FLOTILLA_TOKEN"] == {"secretKeyRef": {"name": objects["Secret"]["metadata"]["name"], "key": "token"}}
    assert env["FLOTILLA_RELEASE"] == "demo"
    assert env["FLOTILLA_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["FLOTILLA_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["FLOTILLA_POD_UID"] == {"fieldRef": {"fieldPath": "metadata.uid"}}
    port = 5000 if values is None else values["service"]["port"]
    assert env["FLOTILLA_MASTER_URL"] == f"http://demo:{port}"
    if name == "custom":
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger-collector:4318"
    else:
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["ports"] == [{"name": "http", "containerPort": 5000, "protocol": "TCP"}]
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}

    service = objects["Service"]["spec"]
    assert service["type"] == "ClusterIP"
    assert service["ports"] == [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]
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
            "workers": [{"capacity": 4}, {"capacity": 4}],
            "resources": [],
        },
    }
    mount = master_container(objects)["volumeMounts"][0]
    assert mount["mountPath"] == "/etc/flotilla"
    volume = objects["Deployment"]["spec"]["template"]["spec"]["volumes"][0]
    assert volume == {"name": mount["name"], "configMap": {"name": objects["ConfigMap"]["metadata"]["name"]}}


def test_custom_cluster_manifest_carries_the_values():
    objects, _ = render(CUSTOM)
    spec = yaml.safe_load(objects["ConfigMap"]["data"]["cluster.yaml"])["spec"]
    assert spec["workers"] == [{"capacity": 3}, {"capacity": 4}, {"capacity": 5}]
    assert spec["image"] == "registry.local/flotilla-worker:dev"
    assert spec["imagePullPolicy"] == "Never"
    assert spec["workerResources"] == {"cpuPerCapacity": 0.5, "memory": "1Gi"}
    assert spec["heartbeat"] == {"intervalSeconds": 2, "timeoutSeconds": 7}
    assert spec["maxAttempts"] == 5
    # The YAML loader must see the types the values had: "007" stays a string.
    assert spec["resources"] == CUSTOM["sharedResources"]
    assert spec["telemetry"] == {"otlpEndpoint": "http://jaeger-collector:4318"}


def test_config_change_restarts_the_master():
    annotation = lambda objects: objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert annotation(render()[0]) != annotation(render({"workers": [{"capacity": 4}]})[0])


def test_token_secret():
    given, _ = render(CUSTOM)
    assert base64.b64decode(given["Secret"]["data"]["token"]).decode() == CUSTOM["auth"]["token"]

    generated, _ = render()
    token = base64.b64decode(generated["Secret"]["data"]["token"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{32}", token)

    existing, _ = render({"auth": {"token": "", "existingSecret": "my-token"}})
    assert "Secret" not in existing
    assert env_of(master_container(existing))["FLOTILLA_TOKEN"] == {"secretKeyRef": {"name": "my-token", "key": "token"}}


def test_notes_say_how_to_reach_the_api():
    _, notes = render(CUSTOM)
    assert "kubectl port-forward --namespace jobs svc/demo 5000:8080" in notes
    assert "kubectl get secret --namespace jobs demo -o jsonpath='{.data.token}' | base64 -d" in notes
    assert 'Authorization: Bearer $FLOTILLA_TOKEN' in notes


BAD_VALUES = {
    "capacity 0": ({"workers": [{"capacity": 4}, {"capacity": 0}]}, ["/workers/1/capacity", "minimum: got 0, want 1"]),
    "empty image": ({"image": {"worker": {"repository": ""}}}, ["/image/worker/repository", "minLength: got 0, want 1"]),
    "runtime nomad": ({"runtime": "nomad"}, ["/runtime", "value must be 'kubernetes'"]),
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
        if obj["kind"] == "Kustomization":
            # kubernetes-validate has no schema for kustomize's own file: check its shape.
            assert obj["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
            assert set(obj) == {"apiVersion", "kind", "resources"}
            assert all((MANIFESTS / name).is_file() for name in obj["resources"])
            continue
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        kinds.append(obj["kind"])
    # The token Secret is left out on purpose (see render-manifests.py).
    assert kinds == ["ServiceAccount", "ConfigMap", "Role", "RoleBinding", "Service", "Deployment"]


def test_plain_manifests_match_a_fresh_render():
    expected = render_manifests.render(CHART)
    assert sorted(path.name for path in MANIFESTS.iterdir()) == sorted(expected)
    for name, text in expected.items():
        current = (MANIFESTS / name).read_text()
        diff = "".join(difflib.unified_diff(
            current.splitlines(True), text.splitlines(True), f"manifests/kubernetes/{name}", "fresh render"))
        assert not diff, f"stale: run .venv-chart/bin/python charts/render-manifests.py\n{diff}"
