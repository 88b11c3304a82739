"""The Helm chart (deploy/helm/inferstack), checked offline with no cluster, docker or
helm binary: strict lint and rendering by Helm's own engine (helm-python-sdk, Helm as
a shared library) over a matrix of values files (the chart's ci/), every rendered
object validated against the Kubernetes schemas (kubernetes-validate, strict: unknown
fields fail) or, for KEDA and Prometheus Operator objects, against schemas written
from their documented fields (tests/deploy/schemas/), then assertions on what the
objects say."""

from __future__ import annotations

import base64
import functools
import json
import re
import tomllib
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils
from pydantic import AliasChoices
from referencing import Registry as SchemaRegistry
from referencing import Resource

from api.settings import ApiSettings
from gpu_worker.settings import WorkerSettings
from inferstack.registry import Registry
from inferstack.settings import REPO_ROOT
from metrics.settings import ExporterSettings
from scheduler.settings import SchedulerSettings

CHART = REPO_ROOT / "deploy" / "helm" / "inferstack"
VALUES_FILES = sorted((CHART / "ci").glob("*.yaml"))
RELEASE, NAMESPACE = "inferstack", "ai"
# The chart's kubeVersion floor and the newest Kubernetes kubernetes-validate knows.
KUBE_VERSIONS = ("1.27.0", kv_utils.latest_version())
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring-servicemonitor.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring-podmonitor.json",
}
# Settings that hold secrets: in a container's env they must come from a Secret.
SECRET_ENV = {"INFERSTACK_ADMIN_KEY", "INFERSTACK_REDIS_URL", "REDIS_URL", "INFERSTACK_RQ_REDIS_URL",
              "INFERSTACK_CLICKHOUSE_URL",
              "REDIS_PASSWORD", "REDISCLI_AUTH", "CLICKHOUSE_PASSWORD"}
# What the chart sets besides settings fields (the log level is read before any settings).
OTHER_ENV = {"INFERSTACK_LOG_LEVEL", "HF_HOME", "HF_HUB_OFFLINE", "HOME", "REDIS_PASSWORD", "REDISCLI_AUTH", "CLICKHOUSE_DB",
             "CLICKHOUSE_USER", "CLICKHOUSE_PASSWORD"}
SETTINGS_OF = {"api": (ApiSettings, SchedulerSettings), "prepare": (WorkerSettings,),
               "worker": (WorkerSettings, SchedulerSettings), "exporter": (ExporterSettings,)}


# -- rendering ------------------------------------------------------------------------


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def load_values(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def render(values: dict) -> list[dict]:
    manifests = chart().render(values, name=RELEASE, namespace=NAMESPACE)
    return [doc for path, text in sorted(manifests.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


@functools.cache
def rendered(name: str) -> tuple[dict, list[dict]]:
    """(values, objects) of one ci/ values file, rendered once per session."""
    values = load_values(CHART / "ci" / name)
    return values, render(values)


def merged_values(values: dict) -> dict:
    """The values an install would use (chart defaults coalesced with ``values``)."""
    return chart().merge_values(values)


def find(objects, kind, name=None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects, kind, name) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def pod_templates(objects) -> list[tuple[dict, dict]]:
    """(workload, pod template) of every Deployment and StatefulSet."""
    return [(o, o["spec"]["template"]) for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def containers(pod: dict) -> list[dict]:
    return pod["spec"].get("initContainers", []) + pod["spec"]["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def api_deployment(objects) -> dict:
    return one(objects, "Deployment", f"{RELEASE}-api")


def api_container(objects) -> dict:
    return next(c for c in api_deployment(objects)["spec"]["template"]["spec"]["containers"] if c["name"] == "api")


def pools(values: dict) -> list[dict]:
    """Each pool over poolDefaults, merged as the chart merges them (two levels)."""
    workers = merged_values(values)["workers"]
    out = []
    for pool in workers["pools"]:
        merged = json.loads(json.dumps(workers["poolDefaults"]))
        for key, value in pool.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        out.append(merged)
    return out


all_values = pytest.mark.parametrize("values_file", [p.name for p in VALUES_FILES], ids=[p.stem for p in VALUES_FILES])


def test_the_matrix_covers_the_deployment_shapes():
    assert {p.name for p in VALUES_FILES} >= {
        "default-values.yaml", "external-redis-values.yaml", "bundled-clickhouse-values.yaml",
        "two-gpu-pools-values.yaml", "keyed-values.yaml", "existing-secrets-values.yaml", "redis-cluster-values.yaml"}


# -- lint and schema -----------------------------------------------------------------


@all_values
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_lint_is_clean_in_strict_mode(values_file, kube_version):
    report = helm.lint(CHART, load_values(CHART / "ci" / values_file), strict=True, kube_version=f"v{kube_version}")
    assert report["total_charts_linted"] == 1
    # Severity 2 is a warning, 3 an error; strict lint fails on both. Info (1) remains.
    assert [m for m in report["messages"] if m["severity"] >= 2] == [] and report["errors"] == []


def test_lint_reports_a_schema_violation():
    """The lint above could not pass by looking at nothing."""
    report = helm.lint(CHART, {"api": {"replicaCount": 3}}, strict=True)
    assert any("replicaCount" in e for e in report["errors"])


@pytest.mark.parametrize("values, where", [
    ({"bogus": 1}, "bogus"),
    ({"workers": {"pools": [{"name": "a"}]}}, "models"),
    ({"workers": {"pools": [{"name": "a", "models": ["smollm2-135m"], "gpus": -1}]}}, "gpus"),
    ({"workers": {"pools": [{"name": "GPU_pool", "models": ["smollm2-135m"]}]}}, "name"),
    ({"workers": {"pools": [{"name": "a", "models": ["smollm2-135m"], "autoscaling": {"minReplicas": 0}}]}},
     "minReplicas"),
    ({"api": {"env": {"INFERSTACK_ADMIN_KEY": "sk-in-plain-sight"}}}, "INFERSTACK_ADMIN_KEY"),
    ({"env": {"INFERSTACK_REDIS_URL": "redis://:pw@host:6379/0"}}, "INFERSTACK_REDIS_URL"),
    ({"keda": {"prometheus": {"authModes": "bearer"}}}, "authSecret"),
    ({"redis": {"bundled": {"password": "p@ss/word"}}}, "password"),
    ({"redis": {"mode": "replicated"}}, "mode"),
    ({"redis": {"rq": {"mode": "cluster"}}}, "mode"),
    ({"models": {"storage": {"type": "nfs"}}}, "type"),
])
def test_schema_rejects_bad_values(values, where):
    with pytest.raises(helm.HelmValuesError) as exc:
        chart().validate_schema(values)
    assert where in str(exc.value)


@all_values
def test_values_files_follow_the_schema(values_file):
    chart().validate_schema(load_values(CHART / "ci" / values_file))


@pytest.mark.parametrize("values, message", [
    ({"workers": {"pools": [{"name": "a", "models": ["gpt-5"]}]}}, 'the model "gpt-5" is not in models.registry'),
    ({"workers": {"pools": [{"name": "a", "models": ["smollm2-135m"], "serves": ["nope"]}]}}, '"nope"'),
    ({"workers": {"pools": [{"name": "a", "models": ["smollm2-135m"]}, {"name": "a", "models": ["kokoro-82m"]}]}},
     "used twice"),
    ({"redis": {"bundled": {"enabled": False}}}, "set exactly one of redis"),
    ({"redis": {"url": "redis://elsewhere:6379/0"}}, "set exactly one of redis"),
    ({"redis": {"mode": "cluster"}}, "the bundled one is standalone"),
    ({"redis": {"mode": "cluster", "bundled": {"enabled": False}, "url": "redis://n1:6379,n2:6379"}},
     'the media model "cogvideox-2b"'),
    ({"redis": {"rq": {"url": "redis://media:6379/0", "existingSecret": "rq"}}}, "at most one of redis.rq"),
    ({"clickhouse": {"bundled": {"enabled": True}}}, "clickhouse.bundled.password is required"),
    ({"clickhouse": {"url": "http://ch:8123", "existingSecret": "ch"}}, "at most one of clickhouse"),
    ({"metrics": {"serviceMonitor": {"enabled": True, "apiBearerToken": True}}}, "needs an admin key"),
    ({"auth": {"keys": '[keys."sha256:00"]\nuser = "a"\n'}}, "keyed mode) needs an admin key"),
    ({"api": {"resources": {"requests": {"cpu": None}}}}, "api.resources.requests.cpu"),  # null deletes a default
    ({"models": {"registry": "[models.x\nmodality = "}}, "not valid TOML"),
])
def test_render_refuses_inconsistent_values(values, message):
    with pytest.raises(helm.HelmRenderError) as exc:
        render(values)
    assert message in str(exc.value)


# -- every object against its schema ------------------------------------------------------


@functools.cache
def crd_validator(kind_key: tuple[str, str], kube_version: str) -> jsonschema.Draft202012Validator:
    version = kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}},
                                           kube_version, strict=True)
    definitions = kv_utils.schema_contents(f"kubernetes-json-schema/v{version}.0-local-strict/_definitions.json",
                                           kube_version)
    schema = json.loads((Path(__file__).parent / "schemas" / CRD_SCHEMAS[kind_key]).read_text())
    registry = Resource.from_contents(definitions) @ SchemaRegistry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


@all_values
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_object_validates_against_its_schema(values_file, kube_version):
    _, objects = rendered(values_file)
    assert objects
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"])
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if key in CRD_SCHEMAS:
            errors = [f"{'.'.join(map(str, e.path))}: {e.message}"
                      for e in crd_validator(key, kube_version).iter_errors(obj)]
            assert not errors, (where, errors)
        else:
            try:  # raises SchemaNotFoundError for a kind it does not know: that fails too
                kubernetes_validate.validate(obj, kube_version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_the_crd_schemas_catch_mistakes():
    _, objects = rendered("external-redis-values.yaml")
    scaled = json.loads(json.dumps(find(objects, "ScaledObject")[0]))
    validator = crd_validator(("keda.sh/v1alpha1", "ScaledObject"), KUBE_VERSIONS[0])
    assert validator.is_valid(scaled)
    for mutate in (lambda o: o["spec"]["triggers"][0]["metadata"].update(threshold=32),  # KEDA wants strings
                   lambda o: o["spec"]["triggers"][0]["metadata"].pop("query"),
                   lambda o: o["spec"].update(maxReplicas=3),  # HPA's spelling, not KEDA's
                   lambda o: o["spec"].update(advanced={"horizontalPodAutoscalerConfig": {
                       "behavior": {"scaleDown": {"stabilizationWindow": 60}}}})):
        broken = json.loads(json.dumps(scaled))
        mutate(broken)
        assert not validator.is_valid(broken)


# -- what the objects say -----------------------------------------------------------------


@all_values
def test_api_probes_ports_and_service(values_file):
    _, objects = rendered(values_file)
    api = api_container(objects)
    assert api["command"] == ["inferstack", "api"]
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    env = env_of(api)
    assert ports["http"] == int(env["INFERSTACK_PORT"]["value"]) and env["INFERSTACK_HOST"]["value"] == "0.0.0.0"
    assert api["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    if env.get("INFERSTACK_KEYS_FILE"):  # /ready needs a key: the probe sends the admin key from the env
        (command,) = [c for c in api["readinessProbe"]["exec"]["command"] if "/ready" in c]
        assert f"127.0.0.1:{ports['http']}/ready" in command and "INFERSTACK_ADMIN_KEY" in command
        assert "INFERSTACK_ADMIN_KEY" in env
    else:
        assert api["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    service = one(objects, "Service", f"{RELEASE}-api")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pod_labels = api_deployment(objects)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


@all_values
def test_services_select_their_pods_and_only_them(values_file):
    _, objects = rendered(values_file)
    pods = {w["metadata"]["name"]: t["metadata"]["labels"] for w, t in pod_templates(objects)}
    for service in find(objects, "Service"):
        selected = [name for name, labels in pods.items() if service["spec"]["selector"].items() <= labels.items()]
        assert selected == [service["metadata"]["name"]], service["metadata"]["name"]


@all_values
def test_hpa_targets_the_api_deployment(values_file):
    values, objects = rendered(values_file)
    autoscaling = merged_values(values)["api"]["autoscaling"]
    deployment = api_deployment(objects)
    hpas = find(objects, "HorizontalPodAutoscaler")
    if not autoscaling["enabled"]:
        assert hpas == [] and deployment["spec"]["replicas"] == merged_values(values)["api"]["replicas"]
        return
    (hpa,) = hpas
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    # The HPA owns the replica count: a `replicas` in the Deployment would reset it on every upgrade.
    assert "replicas" not in deployment["spec"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["averageUtilization"] == autoscaling["targetCPUUtilizationPercentage"]
    assert api_container(objects)["resources"]["requests"]["cpu"]  # utilization is relative to it


@all_values
def test_pdb_selects_the_api_pods_and_nothing_else(values_file):
    _, objects = rendered(values_file)
    (pdb,) = find(objects, "PodDisruptionBudget")
    selector = pdb["spec"]["selector"]["matchLabels"]
    for workload, template in pod_templates(objects):
        selected = selector.items() <= template["metadata"]["labels"].items()
        assert selected == (workload is api_deployment(objects)), workload["metadata"]["name"]
    assert pdb["spec"]["minAvailable"] >= 1
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


@all_values
def test_every_workload_selects_its_own_pods(values_file):
    _, objects = rendered(values_file)
    workloads = pod_templates(objects)
    for workload, template in workloads:
        selector = workload["spec"]["selector"]["matchLabels"]
        owners = [w["metadata"]["name"] for w, t in workloads if selector.items() <= t["metadata"]["labels"].items()]
        assert owners == [workload["metadata"]["name"]]


@all_values
def test_worker_pools_resources_placement_and_env(values_file):
    values, objects = rendered(values_file)
    registry = tomllib.loads(merged_values(values)["models"]["registry"])["models"]
    for pool in pools(values):
        deployment = one(objects, "Deployment", f"{RELEASE}-worker-{pool['name']}")
        spec = deployment["spec"]["template"]["spec"]
        (worker,) = spec["containers"]
        env = env_of(worker)
        assert worker["command"] == ["inferstack", "worker"]
        assert env["INFERSTACK_WORKER_MODELS"]["value"] == ",".join(pool["models"])
        assert env["INFERSTACK_WORKER_SERVES"]["value"] == ",".join(pool["serves"] or pool["models"])
        if not merged_values(values)["models"]["existingConfigMap"]:
            assert set(pool["models"]) | (set(pool["serves"]) - {"*"}) <= set(registry)
        limits, requests = worker["resources"].get("limits", {}), worker["resources"].get("requests", {})
        if pool["gpus"]:
            assert limits["nvidia.com/gpu"] == pool["gpus"] and env["INFERSTACK_DEVICE"]["value"] == "cuda"
            assert requests.get("nvidia.com/gpu", pool["gpus"]) == pool["gpus"]
        else:
            assert "nvidia.com/gpu" not in limits and env["INFERSTACK_DEVICE"]["value"] == "cpu"
        assert spec.get("nodeSelector", {}) == pool["nodeSelector"]
        assert spec.get("tolerations", []) == pool["tolerations"]
        if pool.get("memoryBudgetGB") is not None:  # Helm drops keys whose value is null
            assert float(env["INFERSTACK_MEMORY_BUDGET_GB"]["value"]) == pool["memoryBudgetGB"]
        else:
            assert "INFERSTACK_MEMORY_BUDGET_GB" not in env
        # SIGTERM drains for drainTimeoutS; the kubelet must not kill the worker before.
        assert int(env["INFERSTACK_DRAIN_TIMEOUT_S"]["value"]) == pool["drainTimeoutS"]
        assert spec["terminationGracePeriodSeconds"] > pool["drainTimeoutS"]
        # Started = the metrics port is open = the preloaded models are loaded.
        metrics_port = next(p for p in worker["ports"] if p["name"] == "metrics")["containerPort"]
        assert int(env["INFERSTACK_METRICS_PORT"]["value"]) == metrics_port
        assert env["INFERSTACK_METRICS_HOST"]["value"] == "0.0.0.0"
        assert worker["startupProbe"]["tcpSocket"]["port"] == "metrics"
        assert "livenessProbe" not in worker
        shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"


def model_regex(query: str) -> list[str]:
    return re.findall(r"model=~`([^`]*)`", query)


@all_values
def test_keda_scales_each_pool_on_its_queue_counted_once(values_file):
    values, objects = rendered(values_file)
    merged = merged_values(values)
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o for o in find(objects, "ScaledObject")}
    registry = set(tomllib.loads(merged["models"]["registry"])["models"])
    for pool in pools(values):
        name = f"{RELEASE}-worker-{pool['name']}"
        deployment = one(objects, "Deployment", name)
        if not (merged["keda"]["enabled"] and pool["autoscaling"]["enabled"]):
            assert name not in scaled and deployment["spec"]["replicas"] == pool["replicas"]
            continue
        so = scaled.pop(name)
        assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert "replicas" not in deployment["spec"]  # KEDA's HPA owns it
        assert so["spec"]["minReplicaCount"] == pool["autoscaling"]["minReplicas"] >= 1
        assert so["spec"]["maxReplicaCount"] == pool["autoscaling"]["maxReplicas"]
        (trigger,) = so["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        assert meta["serverAddress"] == merged["keda"]["prometheus"]["serverAddress"]
        assert float(meta["threshold"]) == pool["autoscaling"]["targetPerReplica"]
        assert meta["ignoreNullValues"] == "false"  # no answer must not read as an empty queue
        query = meta["query"]
        # The depth gauge is summed only after `max by (model, tier)`: however many
        # processes export the same Redis-read value, each waiting request counts once.
        assert query.count("inferstack_queue_depth{") == 1
        assert "sum(max by (model, tier) (inferstack_queue_depth{" in query
        assert f'namespace=`{NAMESPACE}`' in query
        for pattern in model_regex(query):
            for model in registry:
                served = model in pool["models"] or model in pool["serves"] or "*" in pool["serves"]
                assert bool(re.fullmatch(pattern, model)) == served, (pool["name"], model, pattern)
        # Running sequences: this pool's pods only, not another pool whose name shares a prefix.
        (pod_pattern,) = re.findall(r"pod=~`([^`]*)`", query)
        assert re.fullmatch(pod_pattern, f"{name}-5d8f7c9b6-x2k4p")
        assert not re.fullmatch(pod_pattern, f"{name}-big-5d8f7c9b6-x2k4p")
        assert not re.fullmatch(pod_pattern, f"{RELEASE}-api-5d8f7c9b6-x2k4p")
        auth = merged["keda"]["prometheus"]["authModes"]
        if auth:
            assert meta["authModes"] == auth
            ta = one(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
            assert {r["parameter"] for r in ta["spec"]["secretTargetRef"]} == {"bearerToken"}
            assert {r["name"] for r in ta["spec"]["secretTargetRef"]} == {merged["keda"]["prometheus"]["authSecret"]}
        else:
            assert "authenticationRef" not in trigger and "authModes" not in meta
    assert scaled == {}  # no ScaledObject without its pool


def test_a_pool_serving_any_model_scales_on_every_queue():
    objects = render({"workers": {"pools": [{"name": "any", "models": ["smollm2-135m"], "serves": ["*"]}]}})
    (so,) = find(objects, "ScaledObject")
    assert set(model_regex(so["spec"]["triggers"][0]["metadata"]["query"])) == {".+"}


def test_model_names_are_matched_literally():
    """`qwen2.5-vl-3b` as a regex would also match `qwen2x5-vl-3b`."""
    objects = render({"workers": {"pools": [{"name": "vl", "models": ["qwen2.5-vl-3b"]}]}})
    (pattern, _) = model_regex(find(objects, "ScaledObject")[0]["spec"]["triggers"][0]["metadata"]["query"])
    assert re.fullmatch(pattern, "qwen2.5-vl-3b") and not re.fullmatch(pattern, "qwen2x5-vl-3b")


@all_values
def test_the_exporter_serves_the_queue_depth(values_file):
    _, objects = rendered(values_file)
    exporter = one(objects, "StatefulSet", f"{RELEASE}-exporter")
    (container,) = exporter["spec"]["template"]["spec"]["containers"]
    env = env_of(container)
    assert container["command"] == ["inferstack", "exporter"]
    port = next(p for p in container["ports"] if p["name"] == "metrics")["containerPort"]
    assert int(env["INFERSTACK_METRICS_PORT"]["value"]) == port
    assert env["INFERSTACK_EXPORTER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    service = one(objects, "Service", f"{RELEASE}-exporter")
    assert service["spec"]["ports"][0]["port"] == port
    annotations = exporter["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(port)


@all_values
def test_bundled_redis_keeps_an_append_only_file_and_never_evicts(values_file):
    values, objects = rendered(values_file)
    merged = merged_values(values)
    statefulsets = find(objects, "StatefulSet", f"{RELEASE}-redis")
    if not merged["redis"]["bundled"]["enabled"]:
        assert statefulsets == [] and find(objects, "Service", f"{RELEASE}-redis") == []
        return
    (redis,) = statefulsets
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs["--appendonly"] == "yes" and pairs["--appendfsync"] == "everysec"
    assert pairs["--maxmemory-policy"] == "noeviction"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "data")
    assert pairs["--dir"] == mount["mountPath"]
    if merged["redis"]["bundled"]["persistence"]["enabled"]:
        assert [t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]] == ["data"]
    if merged["redis"]["bundled"]["password"]:
        assert pairs["--requirepass"] == "$(REDIS_PASSWORD)"
        assert "secretKeyRef" in env_of(container)["REDIS_PASSWORD"]["valueFrom"]


def secret_strings(values: dict) -> set[str]:
    """Every secret the values file gives, and the parts of URLs that are secret."""
    v = merged_values(values)
    found = {v["auth"]["adminKey"], v["auth"]["keys"].strip(), v["redis"]["bundled"]["password"],
             v["clickhouse"]["bundled"]["password"]}
    for url in (v["redis"]["url"], v["clickhouse"]["url"]):
        match = re.match(r"^[a-z]+://([^@/]*)@", url)
        if match:
            found |= {url, match.group(1).split(":", 1)[-1]}
    return {s for s in found if s}


def chart_secret(objects) -> dict[str, str]:
    secrets = find(objects, "Secret", RELEASE)
    return {k: base64.b64decode(v).decode() for k, v in secrets[0]["data"].items()} if secrets else {}


@all_values
def test_secrets_stay_in_secrets(values_file):
    values, objects = rendered(values_file)
    merged = merged_values(values)
    secrets = secret_strings(values)
    for obj in objects:
        if obj["kind"] != "Secret":
            text = yaml.safe_dump(obj)
            assert not [s for s in secrets if s in text], f"{obj['kind']}/{obj['metadata']['name']} holds a secret"
    owned = chart_secret(objects)
    assert set(secrets) <= {s for value in owned.values() for s in secrets if s in value}
    existing = {merged["auth"]["existingSecret"], merged["redis"]["existingSecret"], merged["redis"]["rq"]["existingSecret"],
                merged["clickhouse"]["existingSecret"], merged["keda"]["prometheus"]["authSecret"]} - {""}
    for _, template in pod_templates(objects):
        for container in containers(template):
            for name, entry in env_of(container).items():
                if name in SECRET_ENV:
                    ref = entry["valueFrom"]["secretKeyRef"]  # never a literal value
                    assert ref["name"] in existing or ref["key"] in owned, (name, ref)
        for volume in template["spec"].get("volumes", []):
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                assert name in existing or all(i["key"] in owned for i in volume["secret"]["items"])


def test_secret_urls_are_the_ones_given():
    _, objects = rendered("bundled-clickhouse-values.yaml")
    owned = chart_secret(objects)
    assert owned["redis-url"] == f"redis://:ci-bundled-redis-password-1618@{RELEASE}-redis:6379/0"
    assert owned["clickhouse-url"] == f"http://inferstack:ci-clickhouse-password-2718@{RELEASE}-clickhouse:8123"
    _, objects = rendered("external-redis-values.yaml")
    assert chart_secret(objects)["redis-url"] == "redis://:ci-redis-password-3141@redis.example.internal:6379/2"
    assert find(objects, "StatefulSet", f"{RELEASE}-redis") == []


def test_redis_mode_and_the_media_jobs_own_redis_reach_every_component():
    _, objects = rendered("redis-cluster-values.yaml")
    owned = chart_secret(objects)
    assert owned["redis-url"].startswith("redis://:ci-cluster-password-1729@redis-0.")
    assert owned["rq-redis-url"].startswith("redis://:ci-rq-password-2357@sentinel-0.")
    for _, template in pod_templates(objects):
        for container in containers(template):
            if container["name"] not in SETTINGS_OF:
                continue
            env = env_of(container)
            assert env["INFERSTACK_REDIS_MODE"]["value"] == "cluster"
            assert env["INFERSTACK_RQ_REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "rq-redis-url"
            assert env["INFERSTACK_RQ_REDIS_MODE"]["value"] == "sentinel"
            assert env["INFERSTACK_RQ_SENTINEL_MASTER"]["value"] == "media"
            settings = WorkerSettings(**{k.removeprefix("INFERSTACK_").lower(): e["value"] for k, e in env.items()
                                         if k in ("INFERSTACK_REDIS_MODE", "INFERSTACK_RQ_REDIS_MODE")},
                                      redis_url=owned["redis-url"], rq_redis_url=owned["rq-redis-url"])
            assert settings.rq_redis.mode == "sentinel" and settings.redis.mode == "cluster"
    _, objects = rendered("default-values.yaml")
    env = env_of(api_container(objects))
    assert env["INFERSTACK_REDIS_MODE"]["value"] == "standalone" and "INFERSTACK_RQ_REDIS_URL" not in env


def settings_env_names(*classes) -> set[str]:
    names = set()
    for cls in classes:
        for field_name, field in cls.model_fields.items():
            alias = field.validation_alias
            names |= set(alias.choices) if isinstance(alias, AliasChoices) else {f"INFERSTACK_{field_name.upper()}"}
    return names


@all_values
def test_every_variable_set_is_a_setting_of_its_component(values_file):
    """A misspelt INFERSTACK_* variable is silently ignored by the settings: catch it here."""
    values, objects = rendered(values_file)
    everyone = set(merged_values(values)["env"])
    every_setting = settings_env_names(*{c for classes in SETTINGS_OF.values() for c in classes})
    assert everyone <= every_setting | OTHER_ENV
    for _, template in pod_templates(objects):
        for container in containers(template):
            if container["name"] not in SETTINGS_OF:
                continue
            known = settings_env_names(*SETTINGS_OF[container["name"]]) | OTHER_ENV | everyone
            assert set(env_of(container)) - known == set(), container["name"]


@all_values
def test_volumes_mounts_and_config_references_resolve(values_file):
    values, objects = rendered(values_file)
    merged = merged_values(values)
    configmaps = {o["metadata"]["name"] for o in find(objects, "ConfigMap")} | {merged["models"]["existingConfigMap"]}
    claims = {o["metadata"]["name"] for o in find(objects, "PersistentVolumeClaim")}
    claims.add(merged["models"]["storage"]["persistentVolumeClaim"]["existingClaim"])
    accounts = {o["metadata"]["name"] for o in find(objects, "ServiceAccount")}
    for workload, template in pod_templates(objects):
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        volumes |= {t["metadata"]["name"]: t for t in workload["spec"].get("volumeClaimTemplates", [])}
        for container in containers(template):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, (workload["metadata"]["name"], mount["name"])
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        if "serviceAccountName" in spec:
            assert spec["serviceAccountName"] in accounts
        assert spec["automountServiceAccountToken"] is False


def test_the_default_registry_is_the_repositorys():
    assert tomllib.loads(chart().values["models"]["registry"]) == tomllib.loads(
        (REPO_ROOT / "models.toml").read_text())


@all_values
def test_the_rendered_registry_loads(values_file, tmp_path):
    values, objects = rendered(values_file)
    maps = [o for o in find(objects, "ConfigMap") if "models.toml" in o.get("data", {})]
    if merged_values(values)["models"]["existingConfigMap"]:
        assert maps == []
        return
    (configmap,) = maps
    path = tmp_path / "models.toml"
    path.write_text(configmap["data"]["models.toml"])
    registry = Registry.load(path)
    for pool in pools(values):
        assert all(m in registry for m in pool["models"])


@all_values
def test_the_api_prepares_tokenizers_of_text_and_vision_models(values_file):
    values, objects = rendered(values_file)
    merged = merged_values(values)
    init = api_deployment(objects)["spec"]["template"]["spec"].get("initContainers", [])
    if not merged["models"]["prepare"]["enabled"] or merged["models"]["existingConfigMap"]:
        assert init == []
        return
    (prepare,) = init
    registry = tomllib.loads(merged["models"]["registry"])["models"]
    assert prepare["command"][:2] == ["inferstack", "prepare"]
    assert set(prepare["command"][2:]) == {n for n, m in registry.items() if m["modality"] in ("text", "vision")}
    # It fills the cache the API reads: the same volume at the same place.
    assert all(m in api_container(objects)["volumeMounts"] for m in prepare["volumeMounts"])
    assert {m["name"] for m in prepare["volumeMounts"]} >= {"model-store", "models-registry"}


def test_keyed_mode_mounts_the_keys_and_prometheus_scrapes_with_the_admin_key():
    values, objects = rendered("keyed-values.yaml")
    api = api_container(objects)
    env = env_of(api)
    keys_mount = next(m for m in api["volumeMounts"] if m["name"] == "keys")
    assert env["INFERSTACK_KEYS_FILE"]["value"] == f"{keys_mount['mountPath']}/keys.toml"
    assert chart_secret(objects)["keys.toml"].strip() == values["auth"]["keys"].strip()
    assert env["INFERSTACK_ADMIN_KEY"]["valueFrom"]["secretKeyRef"] == {"name": RELEASE, "key": "admin-key"}
    assert env["INFERSTACK_API_WORKERS"]["value"] == "2"
    monitor = one(objects, "ServiceMonitor", f"{RELEASE}-api")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": RELEASE, "key": "admin-key"}}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    podmonitor = one(objects, "PodMonitor", f"{RELEASE}-workers")
    components = next(e for e in podmonitor["spec"]["selector"]["matchExpressions"]
                      if e["key"] == "app.kubernetes.io/component")
    assert set(components["values"]) == {"worker", "exporter"}  # the exporter carries the queue depth
    ingress = one(objects, "Ingress", f"{RELEASE}-api")
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == f"{RELEASE}-api"


def test_open_mode_has_no_keys_file():
    _, objects = rendered("default-values.yaml")
    env = env_of(api_container(objects))
    assert "INFERSTACK_KEYS_FILE" not in env and "INFERSTACK_ADMIN_KEY" not in env
    assert find(objects, "ServiceMonitor") == []


def test_existing_secrets_are_referenced_not_copied():
    _, objects = rendered("existing-secrets-values.yaml")
    assert find(objects, "Secret") == []  # nothing secret was given to the chart
    env = env_of(api_container(objects))
    assert env["INFERSTACK_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "redis-connection", "key": "url"}
    assert env["INFERSTACK_CLICKHOUSE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "clickhouse-connection",
                                                                             "key": "url"}
    assert env["INFERSTACK_ADMIN_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "inferstack-auth", "key": "admin-key"}
    keys = next(v for v in api_deployment(objects)["spec"]["template"]["spec"]["volumes"] if v["name"] == "keys")
    assert keys["secret"] == {"secretName": "inferstack-auth", "items": [{"key": "keys.toml", "path": "keys.toml"}]}
    store = next(v for v in api_deployment(objects)["spec"]["template"]["spec"]["volumes"] if v["name"] == "model-store")
    assert store["persistentVolumeClaim"] == {"claimName": "model-weights", "readOnly": True}
    assert find(objects, "ScaledObject") == []


@pytest.mark.parametrize("values_file, chdb", [("default-values.yaml", True), ("bundled-clickhouse-values.yaml", False),
                                               ("existing-secrets-values.yaml", False)])
def test_the_exporter_writes_to_clickhouse_or_to_chdb_on_its_volume(values_file, chdb):
    _, objects = rendered(values_file)
    exporter = one(objects, "StatefulSet", f"{RELEASE}-exporter")
    env = env_of(exporter["spec"]["template"]["spec"]["containers"][0])
    assert ("INFERSTACK_CHDB_PATH" in env) == chdb
    assert ("INFERSTACK_CLICKHOUSE_URL" in env) == (not chdb)
    claims = [t["metadata"]["name"] for t in exporter["spec"].get("volumeClaimTemplates", [])]
    assert claims == (["chdb"] if chdb else [])
    clickhouse = find(objects, "StatefulSet", f"{RELEASE}-clickhouse")
    assert len(clickhouse) == (values_file == "bundled-clickhouse-values.yaml")


def test_a_registry_change_rolls_the_pods():
    def checksums(objects):
        return {w["metadata"]["name"]: t["metadata"]["annotations"]["checksum/models"] for w, t in pod_templates(objects)
                if "checksum/models" in t["metadata"]["annotations"]}

    before = checksums(rendered("default-values.yaml")[1])
    registry = chart().values["models"]["registry"] + '\n[models."extra"]\nmodality = "text"\npath = "/x"\n'
    after = checksums(render({"models": {"registry": registry}}))
    assert before.keys() == after.keys() and all(before[k] != after[k] for k in before)
