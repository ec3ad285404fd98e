"""The Helm chart, rendered by the real Helm engine and checked.

Every profile (the default values and each helm/cellgate/ci/*.yaml) is linted,
rendered, validated against the Kubernetes schemas of the oldest release the
chart supports and of the newest one kubernetes-validate knows, and the CRD
objects against their own schemas. Then the properties an operator relies on
are asserted one by one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator import v1 as monitoring_v1

from conftest import (
    CHART,
    NAMESPACE,
    PROFILES,
    RELEASE,
    container,
    deep_merge,
    env_of,
    pod_spec,
)

# The chart's kubeVersion floor (Chart.yaml) and the newest schemas available.
KUBE_VERSIONS = ["1.30", kubernetes_validate.utils.latest_version()]

# Secrets given inline in tests (fake).
WITH_SECRETS = {
    "secrets": {
        "jwtSecret": "test-only-0123456789abcdef0123456789abcdef",
        "databaseUrl": "postgres://cellgate:pw@db.example.internal:5432/cellgate",
    }
}
WITH_REDIS = {"secrets": {"redisUrl": "redis://redis.example.internal:6379/0"}}

PROFILE_IDS = sorted(PROFILES)


def values_of(name: str) -> dict[str, Any]:
    return PROFILES[name]


# --------------------------------------------------------------------------
# Lint and schema validation of every rendered object


@pytest.mark.parametrize("name", PROFILE_IDS)
def test_helm_lint_is_clean(name):
    report = helm.lint(CHART, values_of(name), strict=True, namespace=NAMESPACE)
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # Only informational findings (severity 1, e.g. "icon is recommended").
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert serious == [], serious


def _crd_strict(schema: Any) -> Any:
    """A CRD's openAPIV3Schema with unknown fields refused, like the API server's
    pruning would silently drop them (kubeconform's strict mode does the same)."""
    if isinstance(schema, dict):
        out = {k: _crd_strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_crd_strict(x) for x in schema]
    return schema


_HTTPROUTE = json.loads(
    (Path(__file__).parent / "schemas" / "httproute-v1-experimental-v1.6.1.json").read_text()
)
_HTTPROUTE_VALIDATOR = jsonschema.Draft7Validator(_crd_strict(_HTTPROUTE["schema"]))


def _validate_with_model(model, obj: dict[str, Any]) -> None:
    """Validate with a model generated from the CRD; the round trip must give the
    object back unchanged, or a field was unknown to the CRD (and ignored)."""
    parsed = model.model_validate(obj)
    again = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    assert again == obj, f"{obj['kind']} has fields its CRD does not know"


def validate_object(obj: dict[str, Any], version: str) -> str:
    """Validate one object; returns what it was validated against."""
    api, kind = obj["apiVersion"], obj["kind"]
    if api == "monitoring.coreos.com/v1" and kind == "ServiceMonitor":
        _validate_with_model(monitoring_v1.ServiceMonitor, obj)
        return "prometheus-operator CRD model"
    if api == "monitoring.coreos.com/v1" and kind == "PrometheusRule":
        _validate_with_model(monitoring_v1.PrometheusRule, obj)
        return "prometheus-operator CRD model"
    if api == "gateway.networking.k8s.io/v1" and kind == "HTTPRoute":
        errors = sorted(_HTTPROUTE_VALIDATOR.iter_errors(obj), key=str)
        assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
        return "gateway-api v1.6.1 CRD schema"
    kubernetes_validate.validate(obj, version, strict=True)
    return f"kubernetes {version}"


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", PROFILE_IDS)
def test_every_manifest_validates(render, name, version):
    rendered = render(values_of(name))
    assert rendered.objects, "nothing rendered"
    for obj in rendered.objects:
        try:
            validate_object(obj, version)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} at {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(f"no schema for {obj['kind']}: {e.message}")


def test_crd_validators_catch_mistakes():
    """The CRD checks are not vacuous: a typo or a bad value is caught."""
    sm = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "x"},
        "spec": {"selector": {}, "endpoints": [{"port": "metrics", "intervall": "30s"}]},
    }
    with pytest.raises(AssertionError):
        validate_object(sm, KUBE_VERSIONS[-1])
    sm["spec"]["endpoints"] = [{"port": "metrics", "interval": "30 seconds"}]
    with pytest.raises(Exception):
        validate_object(sm, KUBE_VERSIONS[-1])
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "x"},
        "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "for": "5m"}]}]},
    }
    with pytest.raises(Exception):
        validate_object(rule, KUBE_VERSIONS[-1])
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "x"},
        "spec": {"rules": [{"sessionPersistence": {"type": "Sticky"}}]},
    }
    with pytest.raises(AssertionError):
        validate_object(route, KUBE_VERSIONS[-1])
    route["spec"]["rules"] = [{"sesionPersistence": {}}]
    with pytest.raises(AssertionError):
        validate_object(route, KUBE_VERSIONS[-1])


def test_kubernetes_validate_is_strict():
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c", "image": "i", "readinessProbe": {"httpGett": {}}}]},
            },
        },
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_object(deployment, KUBE_VERSIONS[-1])


# --------------------------------------------------------------------------
# What each profile must render


EXPECTED_KINDS = {
    "default": {"Deployment", "Service", "ConfigMap", "Secret", "ServiceAccount", "Job"},
    "ingress-affinity-autoscaling-values": {
        "Deployment", "Service", "ConfigMap", "Secret", "ServiceAccount", "Job",
        "Ingress", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor",
    },
    "existing-secret-networkpolicy-values": {
        "Deployment", "Service", "ConfigMap", "ServiceAccount", "Job",
        "NetworkPolicy", "PodDisruptionBudget", "PrometheusRule",
    },
    "httproute-publickey-values": {
        "Deployment", "Service", "ConfigMap", "Secret", "ServiceAccount", "Job",
        "HTTPRoute", "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule",
    },
}


@pytest.mark.parametrize("name", PROFILE_IDS)
def test_profile_renders_the_expected_kinds(render, name):
    assert name in EXPECTED_KINDS, f"add the new profile {name} to EXPECTED_KINDS"
    kinds = {o["kind"] for o in render(values_of(name)).objects}
    assert kinds == EXPECTED_KINDS[name]


@pytest.mark.parametrize("name", PROFILE_IDS)
def test_every_object_is_in_the_release_namespace_and_labelled(render, name):
    for obj in render(values_of(name)).objects:
        meta = obj["metadata"]
        assert meta["namespace"] == NAMESPACE, meta["name"]
        assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"


# --------------------------------------------------------------------------
# Probes, ports and settings


@pytest.mark.parametrize("name", PROFILE_IDS)
def test_probes_hit_the_real_paths_on_the_app_port(render, name):
    rendered = render(values_of(name))
    c = rendered.gateway_container
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    config = rendered.one("ConfigMap")["data"]
    app_port = int(config["CELLGATE_LISTEN_ADDR"].rsplit(":", 1)[1])
    metrics_port = int(config["CELLGATE_METRICS_ADDR"].rsplit(":", 1)[1])
    assert ports == {"http": app_port, "metrics": metrics_port}
    assert app_port != metrics_port

    def target(probe):
        get = probe["httpGet"]
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        return get["path"], port

    assert target(c["livenessProbe"]) == ("/healthz", app_port)
    assert target(c["startupProbe"]) == ("/healthz", app_port)
    assert target(c["readinessProbe"]) == ("/readyz", app_port)


def test_listen_addresses_bind_all_interfaces_in_the_pod(render):
    data = render({}).one("ConfigMap")["data"]
    assert data["CELLGATE_LISTEN_ADDR"] == "0.0.0.0:3000"
    assert data["CELLGATE_METRICS_ADDR"] == "0.0.0.0:9091"
    v6 = render({"config": {"listenHost": "::"}}).one("ConfigMap")["data"]
    assert v6["CELLGATE_LISTEN_ADDR"] == "[::]:3000"


def test_configmap_holds_the_gateway_settings(render):
    data = render({}).one("ConfigMap")["data"]
    assert data == {
        "CELLGATE_PROFILE": "production",
        "CELLGATE_LISTEN_ADDR": "0.0.0.0:3000",
        "CELLGATE_METRICS_ADDR": "0.0.0.0:9091",
        "CELLGATE_LOG_FORMAT": "json",
        "RUST_LOG": "info",
        "CELLGATE_DIRECTORY_CACHE_TTL_SECS": "30",
        "CELLGATE_MAX_BODY_BYTES": "524288",
        "CELLGATE_DEFAULT_SEATS": "200",
        "CELLGATE_ALLOW_QUERY_TOKEN": "false",
        "CELLGATE_DRAIN_SECS": "10",
        "CELLGATE_SESSION_TTL_SECS": "30",
        "CELLGATE_REDIS_PREFIX": "cellgate",
        "CELLGATE_JWT_LEEWAY_SECS": "30",
        "CELLGATE_HANDSHAKES_PER_MINUTE": "120",
        "CELLGATE_HANDSHAKE_BURST": "60",
        "CELLGATE_INGEST_PER_MINUTE": "600",
        "CELLGATE_INGEST_BURST": "120",
        "CELLGATE_MAX_SOCKET_PAYLOAD_BYTES": "65536",
        "CELLGATE_MAX_SOCKETS_PER_INSTRUCTOR": "20",
        "CELLGATE_MAX_SOCKETS": "10000",
        "CELLGATE_SOCKET_QUEUE_PACKETS": "4096",
    }
    given = render(
        {"config": {"jwt": {"issuer": "https://sso.example.edu", "audience": "cellgate",
                            "algorithms": ["RS256", "ES256"]}}}
    ).one("ConfigMap")["data"]
    assert given["CELLGATE_JWT_ISSUER"] == "https://sso.example.edu"
    assert given["CELLGATE_JWT_AUDIENCE"] == "cellgate"
    # The gateway parses the variable as a list, like `["RS256"]` in its --help.
    assert json.loads(given["CELLGATE_JWT_ALGORITHMS"]) == ["RS256", "ES256"]


def test_origins_proxies_and_limits_reach_the_gateway(render):
    data = render(
        {"config": {"allowedOrigins": ["https://dash.example.edu"],
                    "trustedProxies": ["10.0.0.0/8", "fd00::/8"],
                    "limits": {"handshakesPerMinute": 0, "maxSockets": 2500}}}
    ).one("ConfigMap")["data"]
    assert json.loads(data["CELLGATE_ALLOWED_ORIGINS"]) == ["https://dash.example.edu"]
    assert json.loads(data["CELLGATE_TRUSTED_PROXIES"]) == ["10.0.0.0/8", "fd00::/8"]
    assert data["CELLGATE_HANDSHAKES_PER_MINUTE"] == "0"
    assert data["CELLGATE_MAX_SOCKETS"] == "2500"
    assert data["CELLGATE_SOCKET_QUEUE_PACKETS"] == "4096", "the other limits keep their defaults"


def test_cluster_settings_reach_the_gateway(render):
    data = render({"config": {"sessionTtlSecs": 12, "redisPrefix": "cg-blue_2"}}).one("ConfigMap")["data"]
    assert data["CELLGATE_SESSION_TTL_SECS"] == "12"
    assert data["CELLGATE_REDIS_PREFIX"] == "cg-blue_2"


@pytest.mark.parametrize(
    "config",
    [{"sessionTtlSecs": 2}, {"redisPrefix": ""}, {"redisPrefix": "cg:blue"}, {"redisPrefix": "cg blue"}],
)
def test_cluster_settings_the_gateway_would_refuse_are_refused_by_the_schema(chart, config):
    # The gateway refuses these at start-up; the chart says so before anything is deployed.
    (key,) = config
    with pytest.raises(helm.HelmValuesError, match=f"/config/{key}"):
        chart.render({"config": config}, name=RELEASE)


@pytest.mark.parametrize("name", PROFILE_IDS)
def test_gateway_gets_its_settings_from_configmap_and_secret(render, name):
    values = values_of(name)
    rendered = render(values)
    c = rendered.gateway_container
    assert c["args"] == ["serve", "--profile", "production"]
    assert c["envFrom"] == [{"configMapRef": {"name": rendered.one("ConfigMap")["metadata"]["name"]}}]
    env = env_of(c)
    assert env["CELLGATE_NODE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}

    secrets = values.get("secrets", {})
    secret_name = secrets.get("existingSecret") or rendered.one("Secret", RELEASE)["metadata"]["name"]
    keys = {
        "CELLGATE_JWT_SECRET": "CELLGATE_JWT_SECRET",
        "CELLGATE_DATABASE_URL": "CELLGATE_DATABASE_URL",
        "CELLGATE_REDIS_URL": "CELLGATE_REDIS_URL",
    }
    for var, key in zip(keys, ("jwtSecret", "databaseUrl", "redisUrl")):
        keys[var] = secrets.get("keys", {}).get(key, keys[var])
    public_key = values.get("config", {}).get("jwt", {}).get("publicKey", {}).get("secretName")
    if public_key:
        # One key source only: the gateway refuses a secret and a key file together.
        del keys["CELLGATE_JWT_SECRET"]
        assert "CELLGATE_JWT_SECRET" not in env
    several_pods = values.get("replicaCount", 1) > 1 or values.get("autoscaling", {}).get("enabled", False)
    for var, key in keys.items():
        # A missing key reaches the gateway as a missing setting, which it
        # names; except Redis with several pods (see test_several_pods_cannot_lose_redis).
        optional = not (var == "CELLGATE_REDIS_URL" and several_pods)
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": secret_name, "key": key, "optional": optional}
    # No secret value ever sits in the pod spec or the ConfigMap.
    spec_text = json.dumps(rendered.deployment) + json.dumps(rendered.one("ConfigMap"))
    for secret_value in ("jwtSecret", "databaseUrl", "redisUrl"):
        if secrets.get(secret_value):
            assert secrets[secret_value] not in spec_text


def test_chart_made_secret_holds_only_what_was_given(render):
    import base64

    data = render(deep_merge(WITH_SECRETS, {})).one("Secret", RELEASE)["data"]
    decoded = {k: base64.b64decode(v).decode() for k, v in data.items()}
    assert decoded == {
        "CELLGATE_JWT_SECRET": WITH_SECRETS["secrets"]["jwtSecret"],
        "CELLGATE_DATABASE_URL": WITH_SECRETS["secrets"]["databaseUrl"],
    }
    assert render({}).one("Secret", RELEASE).get("data") == {}


def test_public_key_is_mounted_where_the_setting_points(render):
    rendered = render(values_of("httproute-publickey-values"))
    data = rendered.one("ConfigMap")["data"]
    path = data["CELLGATE_JWT_PUBLIC_KEY_FILE"]
    assert path == "/etc/cellgate/jwt/public.pem"
    for workload in (rendered.deployment, rendered.job):
        spec = pod_spec(workload)
        c = spec["containers"][0]
        mount = next(m for m in c["volumeMounts"] if m["name"] == "jwt-public-key")
        assert mount["readOnly"] is True
        volume = next(v for v in spec["volumes"] if v["name"] == "jwt-public-key")
        assert volume["secret"]["secretName"] == "sso-public-key"
        item = volume["secret"]["items"][0]
        assert f"{mount['mountPath']}/{item['path']}" == path


CA_DIR = "/etc/cellgate/ca"


def _ca_mounts(workload: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    spec = pod_spec(workload)
    mounts = [m for c in spec["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] == CA_DIR]
    names = {m["name"] for m in mounts}
    return mounts, [v for v in spec["volumes"] if v["name"] in names]


def test_no_ca_certificates_by_default(render):
    rendered = render(deep_merge(WITH_SECRETS, WITH_REDIS))
    for workload in (rendered.deployment, rendered.job):
        assert _ca_mounts(workload) == ([], [])
        assert not any(v["name"] == "ca-certificates" for v in pod_spec(workload)["volumes"])
    assert "CELLGATE_REDIS_CA_FILE" not in rendered.one("ConfigMap")["data"]
    assert "CELLGATE_REDIS_CA_FILE" not in env_of(container(rendered.job, "migrate"))


@pytest.mark.parametrize(
    "tls, source",
    [
        ({"caSecret": "cellgate-ca"}, {"secret": {"secretName": "cellgate-ca"}}),
        ({"caConfigMap": "cellgate-ca"}, {"configMap": {"name": "cellgate-ca"}}),
    ],
    ids=["secret", "configmap"],
)
def test_ca_certificates_are_mounted_read_only_for_gateway_and_migration(render, tls, source):
    # The migration connects to PostgreSQL too, so it needs the CA of an
    # sslrootcert= in the database URL as much as the gateway does.
    values = deep_merge(WITH_SECRETS, {"tls": tls})
    values["secrets"]["databaseUrl"] += f"?sslmode=verify-full&sslrootcert={CA_DIR}/ca.pem"
    rendered = render(values)
    for workload in (rendered.deployment, rendered.job):
        mounts, volumes = _ca_mounts(workload)
        assert len(mounts) == 1, workload["kind"]
        assert mounts[0]["readOnly"] is True
        assert "subPath" not in mounts[0]
        assert len(volumes) == 1
        volume = {k: v for k, v in volumes[0].items() if k != "name"}
        assert volume == source, volume
    # Without tls.redisCaKey the Redis client keeps to the system's CAs.
    assert "CELLGATE_REDIS_CA_FILE" not in rendered.one("ConfigMap")["data"]


def test_redis_ca_key_sets_the_ca_file_to_the_mounted_file(render):
    values = deep_merge(WITH_SECRETS, {
        "replicaCount": 2,
        "secrets": {"redisUrl": "rediss://:pw@redis.example.internal:6380/0"},
        "tls": {"caConfigMap": "cellgate-ca", "redisCaKey": "redis-ca.pem"},
    })
    rendered = render(values)
    path = f"{CA_DIR}/redis-ca.pem"
    assert rendered.one("ConfigMap")["data"]["CELLGATE_REDIS_CA_FILE"] == path
    mounts, _ = _ca_mounts(rendered.deployment)
    assert path.startswith(mounts[0]["mountPath"] + "/")
    # The gateway reads the ConfigMap; the migration hook, run before it
    # exists, has the same settings inline (it does not use this one).
    configmap = rendered.one("ConfigMap")["metadata"]["name"]
    assert rendered.gateway_container["envFrom"] == [{"configMapRef": {"name": configmap}}]
    assert env_of(container(rendered.job, "migrate"))["CELLGATE_REDIS_CA_FILE"]["value"] == path
    # The rediss:// URL reaches the pods through the chart-made Secret.
    import base64
    data = rendered.one("Secret", RELEASE)["data"]
    assert base64.b64decode(data["CELLGATE_REDIS_URL"]).decode().startswith("rediss://")


def test_a_new_redis_ca_key_rolls_the_pods(render):
    base = deep_merge(WITH_SECRETS, {"tls": {"caSecret": "cellgate-ca"}})
    before = render(base).deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    after = render(deep_merge(base, {"tls": {"redisCaKey": "ca.pem"}})).deployment
    assert after["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != before


def test_node_id_and_redis_only_where_needed(render):
    rendered = render(deep_merge(WITH_SECRETS, WITH_REDIS))
    job_env = env_of(container(rendered.job, "migrate"))
    # The migration does not talk to Redis.
    assert "CELLGATE_REDIS_URL" not in job_env
    assert job_env["CELLGATE_PROFILE"]["value"] == "production"


# --------------------------------------------------------------------------
# Drain and grace period


@pytest.mark.parametrize("name", PROFILE_IDS)
def test_grace_period_exceeds_the_drain_window(render, name):
    values = values_of(name)
    rendered = render(values)
    spec = pod_spec(rendered.deployment)
    drain = int(rendered.one("ConfigMap")["data"]["CELLGATE_DRAIN_SECS"])
    assert drain == values.get("config", {}).get("drainSecs", 10)
    pre_stop = spec["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    # SIGTERM comes after the preStop sleep; then the drain must end with a margin.
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + 10


def test_explicit_grace_period_must_exceed_the_drain_window(chart, render):
    ok = render({"terminationGracePeriodSeconds": 60, "config": {"drainSecs": 30}})
    assert pod_spec(ok.deployment)["terminationGracePeriodSeconds"] == 60
    with pytest.raises(helm.HelmRenderError, match="must exceed"):
        chart.render({"terminationGracePeriodSeconds": 12, "config": {"drainSecs": 10}}, name=RELEASE)
    # After the window the gateway needs up to about 5 s more to finish
    # in-flight requests and exit: preStop 3 + drain 10 + 5 = 18 is too short…
    with pytest.raises(helm.HelmRenderError, match=r"\+ 5 \(18\)"):
        chart.render({"terminationGracePeriodSeconds": 18, "config": {"drainSecs": 10}}, name=RELEASE)
    # …and 19 is enough.
    enough = render({"terminationGracePeriodSeconds": 19, "config": {"drainSecs": 10}})
    assert pod_spec(enough.deployment)["terminationGracePeriodSeconds"] == 19
    derived = render({"config": {"drainSecs": 45}, "lifecycle": {"preStopSleepSeconds": 0}})
    spec = pod_spec(derived.deployment)
    assert spec["terminationGracePeriodSeconds"] == 60
    assert "lifecycle" not in spec["containers"][0]


# --------------------------------------------------------------------------
# Hardening


def _all_pod_specs(rendered) -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for obj in rendered.objects:
        if obj["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            specs.append((f"{obj['kind']}/{obj['metadata']['name']}", pod_spec(obj)))
    return specs


@pytest.mark.parametrize("name", PROFILE_IDS)
def test_no_container_runs_as_root(render, name):
    specs = _all_pod_specs(render(values_of(name)))
    assert {n.split("/")[0] for n, _ in specs} == {"Deployment", "Job"}
    for where, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, where
        assert pod.get("runAsUser", 1) != 0, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc.get("runAsUser", pod.get("runAsUser", 1)) != 0, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert "privileged" not in sc or sc["privileged"] is False, where
            # A writable /tmp on the read-only root filesystem.
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert "/tmp" in mounts, where
            volume = next(v for v in spec["volumes"] if v["name"] == mounts["/tmp"])
            assert "emptyDir" in volume, where


def test_platform_assigned_uid_still_non_root(render):
    rendered = render({"securityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None}})
    spec = pod_spec(rendered.deployment)
    assert "runAsUser" not in spec["securityContext"]
    assert "runAsUser" not in spec["containers"][0]["securityContext"]
    assert spec["containers"][0]["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("name", PROFILE_IDS)
def test_no_service_account_token_and_no_service_links(render, name):
    rendered = render(values_of(name))
    for sa in rendered.all("ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False
    for where, spec in _all_pod_specs(rendered):
        assert spec["automountServiceAccountToken"] is False, where
        # Kubernetes would add CELLGATE_SERVICE_HOST & co., which the gateway
        # refuses as unknown settings.
        assert spec["enableServiceLinks"] is False, where
    sa_names = {sa["metadata"]["name"] for sa in rendered.all("ServiceAccount")}
    assert pod_spec(rendered.deployment)["serviceAccountName"] in sa_names


@pytest.mark.parametrize("name", PROFILE_IDS)
def test_resources_and_topology_spread(render, name):
    spec = pod_spec(render(values_of(name)).deployment)
    resources = spec["containers"][0]["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]
    keys = {t["topologyKey"] for t in spec["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    selector = render(values_of(name)).deployment["spec"]["selector"]["matchLabels"]
    for t in spec["topologySpreadConstraints"]:
        assert t["labelSelector"]["matchLabels"] == selector


# --------------------------------------------------------------------------
# Rolling on config change


def _checksums(rendered) -> dict[str, str]:
    annotations = rendered.deployment["spec"]["template"]["metadata"]["annotations"]
    return {k: v for k, v in annotations.items() if k.startswith("checksum/")}


def test_checksum_annotation_changes_when_config_changes(render):
    base = _checksums(render({}))
    assert set(base) == {"checksum/config", "checksum/secret"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", v) for v in base.values())
    assert _checksums(render({})) == base
    for change in (
        {"config": {"rustLog": "debug"}},
        {"config": {"drainSecs": 20}},
        {"config": {"jwt": {"audience": "cellgate"}}},
    ):
        changed = _checksums(render(change))
        assert changed["checksum/config"] != base["checksum/config"], change
        assert changed["checksum/secret"] == base["checksum/secret"], change
    secret_changed = _checksums(render({"secrets": {"databaseUrl": "postgres://u:p@other/cellgate"}}))
    assert secret_changed["checksum/secret"] != base["checksum/secret"]
    assert secret_changed["checksum/config"] == base["checksum/config"]
    # Scaling is not a config change: no roll.
    assert _checksums(render(deep_merge(WITH_REDIS, {"replicaCount": 3})))["checksum/config"] == base[
        "checksum/config"
    ]


def test_no_secret_checksum_with_an_existing_secret(render):
    sums = _checksums(render(values_of("existing-secret-networkpolicy-values")))
    assert set(sums) == {"checksum/config"}


# --------------------------------------------------------------------------
# Migration hook


@pytest.mark.parametrize("name", PROFILE_IDS)
def test_migration_job_is_a_pre_install_and_pre_upgrade_hook(render, name):
    rendered = render(values_of(name))
    job = rendered.job
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    c = container(job, "migrate")
    assert c["args"] == ["migrate"]
    assert c["image"] == rendered.gateway_container["image"]
    spec = pod_spec(job)
    assert spec["restartPolicy"] == "Never"
    # Hook pods must not be picked up by the gateway's Service or PDB.
    selector = rendered.deployment["spec"]["selector"]["matchLabels"]
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert not all(pod_labels.get(k) == v for k, v in selector.items())

    # Everything the Job needs exists before it runs: hooks of lower weight or
    # objects that were there before the release (an existing Secret).
    weight = int(annotations["helm.sh/hook-weight"])
    hooks = {
        (o["kind"], o["metadata"]["name"]): o
        for o in rendered.objects
        if "helm.sh/hook" in o["metadata"].get("annotations", {})
    }
    for needed in ("Secret", "ServiceAccount"):
        refs = set()
        if needed == "ServiceAccount":
            refs.add(spec["serviceAccountName"])
        else:
            for e in c["env"]:
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add(ref["name"])
        for ref in refs:
            hook = hooks.get((needed, ref))
            existing = ref == values_of(name).get("secrets", {}).get("existingSecret")
            assert hook or existing, f"the migration Job needs {needed} {ref}, which is not there before it"
            if hook:
                assert hook["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
                assert int(hook["metadata"]["annotations"]["helm.sh/hook-weight"]) < weight
    # No ConfigMap needed: the settings are inline.
    assert "envFrom" not in c
    env = env_of(c)
    for key, value in rendered.one("ConfigMap")["data"].items():
        assert env[key]["value"] == value


def test_migration_hook_secret_copies_the_chart_secret(render):
    rendered = render(WITH_SECRETS)
    main = rendered.one("Secret", RELEASE)
    hook = rendered.one("Secret", f"{RELEASE}-migrate")
    assert hook["data"] == main["data"]
    assert "hook-succeeded" in hook["metadata"]["annotations"]["helm.sh/hook-delete-policy"]


def test_migrations_can_be_turned_off(render):
    rendered = render({"migrations": {"enabled": False}})
    assert rendered.all("Job") == []
    assert "cellgate migrate" in rendered.notes
    # Pods exit on an outdated schema, and an old pod's binary only knows old
    # migrations: the notes must not send the operator to `kubectl exec … migrate`.
    assert not re.search(r"exec \S+ -- \S*cellgate migrate", rendered.notes), rendered.notes
    assert f"rollout restart deploy/{RELEASE}" in rendered.notes


# --------------------------------------------------------------------------
# Exposure: Service, Ingress with affinity, HTTPRoute


@pytest.mark.parametrize("name", PROFILE_IDS)
def test_service_targets_the_named_ports(render, name):
    rendered = render(values_of(name))
    service = rendered.one("Service")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["http"]["targetPort"] == "http"
    assert ports["metrics"]["targetPort"] == "metrics"
    assert service["spec"]["selector"] == rendered.deployment["spec"]["selector"]["matchLabels"]
    monitor = rendered.maybe("ServiceMonitor")
    if monitor:
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
        labels = service["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())


AFFINITY = {
    "nginx.ingress.kubernetes.io/affinity": "cookie",
    "nginx.ingress.kubernetes.io/affinity-mode": "persistent",
    "nginx.ingress.kubernetes.io/session-cookie-name": "cellgate-affinity",
    "nginx.ingress.kubernetes.io/session-cookie-max-age": "28800",
    "nginx.ingress.kubernetes.io/session-cookie-expires": "28800",
}


def test_ingress_has_cookie_affinity_and_websocket_timeouts(render):
    rendered = render(values_of("ingress-affinity-autoscaling-values"))
    ingress = rendered.one("Ingress")
    annotations = ingress["metadata"]["annotations"]
    for key, value in AFFINITY.items():
        assert annotations[key] == value, key
    assert annotations["nginx.ingress.kubernetes.io/session-cookie-samesite"] == "None"
    assert annotations["nginx.ingress.kubernetes.io/session-cookie-secure"] == "true"
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations[f"nginx.ingress.kubernetes.io/{key}"]) >= 3600
    # The controller's body limit follows the gateway's.
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "524288"
    # Annotations are strings, as Kubernetes requires.
    assert all(isinstance(v, str) for v in annotations.values())
    # The operator's own annotations are kept.
    assert annotations["cert-manager.io/cluster-issuer"] == "letsencrypt"
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    backend = spec["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": rendered.one("Service")["metadata"]["name"], "port": {"name": "http"}}
    assert spec["tls"][0]["hosts"] == ["cellgate.example.edu"]


def test_ingress_affinity_follows_the_values(render):
    base = {"ingress": {"enabled": True}}
    on = render(base).one("Ingress")["metadata"]["annotations"]
    for key, value in AFFINITY.items():
        assert on[key] == value
    off = render(deep_merge(base, {"ingress": {"nginx": {"affinity": {"enabled": False}}}}))
    off_annotations = off.one("Ingress")["metadata"]["annotations"]
    assert not any("affinity" in k or "session-cookie" in k for k in off_annotations)
    assert off_annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    other = render(deep_merge(base, {"ingress": {"className": "traefik", "nginx": {"enabled": False}}}))
    assert "annotations" not in other.one("Ingress")["metadata"]
    overridden = render(deep_merge(base, {"ingress": {"annotations": {
        "nginx.ingress.kubernetes.io/proxy-read-timeout": "7200"}}}))
    assert overridden.one("Ingress")["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/proxy-read-timeout"] == "7200"
    big = render(deep_merge(base, {"config": {"maxBodyBytes": 4194304}}))
    assert big.one("Ingress")["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/proxy-body-size"] == "4194304"


def test_httproute_has_cookie_session_persistence(render):
    rendered = render(values_of("httproute-publickey-values"))
    route = rendered.one("HTTPRoute")
    rule = route["spec"]["rules"][0]
    assert rule["sessionPersistence"]["type"] == "Cookie"
    assert rule["sessionPersistence"]["sessionName"] == "cellgate-affinity"
    service = rendered.one("Service")
    http_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "http")
    assert rule["backendRefs"] == [{"name": service["metadata"]["name"], "port": http_port}]
    assert route["spec"]["parentRefs"][0]["name"] == "public"
    assert rendered.maybe("Ingress") is None


# --------------------------------------------------------------------------
# Scaling: HPA and PDB


def test_autoscaling_profile(render):
    rendered = render(values_of("ingress-affinity-autoscaling-values"))
    assert "replicas" not in rendered.deployment["spec"]
    hpa = rendered.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": rendered.deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "cellgate_connected_sockets"
    assert metrics["Pods"]["pods"]["target"] == {"type": "AverageValue", "averageValue": "1500"}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert rendered.one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_pdb_only_with_several_pods(render):
    assert render({}).maybe("PodDisruptionBudget") is None
    pdb = render(deep_merge(WITH_REDIS, {"replicaCount": 2})).one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == render({}).deployment["spec"]["selector"]["matchLabels"]


def test_several_pods_cannot_lose_redis(render):
    """With several pods, a Secret without the Redis key must stop the pods
    (Kubernetes refuses a required key that is missing) rather than let each
    pod run alone in single-node mode, deaf to the others' events."""
    def redis_ref(values):
        return env_of(render(values).gateway_container)["CELLGATE_REDIS_URL"]["valueFrom"]["secretKeyRef"]

    existing = {"secrets": {"existingSecret": "creds", "keys": {"redisUrl": "redis-url"}}}
    assert redis_ref(existing) == {"name": "creds", "key": "redis-url", "optional": True}
    assert redis_ref(deep_merge(existing, {"replicaCount": 3}))["optional"] is False
    assert redis_ref(deep_merge(existing, {"autoscaling": {"enabled": True}}))["optional"] is False
    assert redis_ref(deep_merge(WITH_REDIS, {"replicaCount": 2}))["optional"] is False
    # The other keys stay optional: the gateway names a missing one itself.
    env = env_of(render(deep_merge(existing, {"replicaCount": 3})).gateway_container)
    for var in ("CELLGATE_JWT_SECRET", "CELLGATE_DATABASE_URL"):
        assert env[var]["valueFrom"]["secretKeyRef"]["optional"] is True, var


def test_several_pods_need_redis(chart, render):
    for values in ({"replicaCount": 2}, {"autoscaling": {"enabled": True}}):
        with pytest.raises(helm.HelmRenderError, match="needs Redis"):
            chart.render(values, name=RELEASE)
    render(deep_merge(WITH_REDIS, {"replicaCount": 2}))
    # With an existing Secret the chart cannot look inside: it trusts the operator.
    render({"replicaCount": 2, "secrets": {"existingSecret": "creds"}})


# --------------------------------------------------------------------------
# NetworkPolicy


def test_network_policy_opens_metrics_to_the_monitoring_namespace_only(render):
    rendered = render(values_of("existing-secret-networkpolicy-values"))
    policy = rendered.one("NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == rendered.deployment["spec"]["selector"]["matchLabels"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    by_port: dict[str, list[dict[str, Any]]] = {}
    for rule in spec["ingress"]:
        for port in rule["ports"]:
            by_port.setdefault(port["port"], []).append(rule)
    assert set(by_port) == {"http", "metrics"}
    # No rule opens the metrics port together with another, or to everyone.
    (metrics_rule,) = by_port["metrics"]
    assert [p["port"] for p in metrics_rule["ports"]] == ["metrics"]
    peers = metrics_rule["from"]
    assert len(peers) == 1
    assert peers[0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    assert peers[0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    (http_rule,) = by_port["http"]
    assert http_rule["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ingress-nginx"}
    egress_ports = {(p["port"], p["protocol"]) for rule in spec["egress"] for p in rule["ports"]}
    assert {(53, "UDP"), (53, "TCP"), (5432, "TCP"), (6379, "TCP"), (4317, "TCP")} == egress_ports
    # The named ports exist on the pods.
    names = {p["name"] for p in rendered.gateway_container["ports"]}
    assert {"http", "metrics"} <= names


def test_network_policy_default_lets_anyone_reach_the_app_port_only(render):
    spec = render({"networkPolicy": {"enabled": True}}).one("NetworkPolicy")["spec"]
    http_rule = next(r for r in spec["ingress"] if r["ports"][0]["port"] == "http")
    assert "from" not in http_rule
    metrics_rule = next(r for r in spec["ingress"] if r["ports"][0]["port"] == "metrics")
    assert metrics_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert spec["policyTypes"] == ["Ingress"]


# --------------------------------------------------------------------------
# Alerts


ALERTS = {
    "CellgateAuthFailureRatioHigh": ["cellgate_auth_failures_total", "cellgate_auth_duration_seconds_count"],
    "CellgateAuthLatencyHigh": ["cellgate_auth_duration_seconds_bucket"],
    "CellgatePodNotClusterHealthy": ["cellgate_cluster_healthy"],
    "CellgateEventRejectionsRising": ["cellgate_events_rejected_total",
                                      "cellgate_ingest_request_duration_seconds_count"],
    "CellgateNoDashboardsDuringClassHours": ["cellgate_connected_sockets"],
}


def _rules(rendered) -> dict[str, dict[str, Any]]:
    rule = rendered.one("PrometheusRule")
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def test_prometheus_rule_has_every_alert_on_the_gateway_metrics(render):
    rules = _rules(render(values_of("existing-secret-networkpolicy-values")))
    assert set(rules) == set(ALERTS)
    for alert, metrics in ALERTS.items():
        expr = rules[alert]["expr"]
        for metric in metrics:
            assert metric in expr, (alert, metric)
        # Every series is scoped to this release's Service and namespace.
        for selector in re.findall(r"cellgate_[a-z_]+\{([^}]*)\}", expr):
            assert f'job="{RELEASE}"' in selector and f'namespace="{NAMESPACE}"' in selector, alert
        assert rules[alert]["labels"]["severity"] in ("warning", "critical")
        assert rules[alert]["annotations"]["summary"]
    # Rejected POSTs over all POSTs: both in requests. Accepted events (up to
    # 500 per POST) would make the ratio far too small to ever fire.
    assert "cellgate_events_ingested_total" not in rules["CellgateEventRejectionsRising"]["expr"]
    assert 'outcome="accepted"' in rules["CellgateAuthLatencyHigh"]["expr"]
    assert "histogram_quantile(0.95" in rules["CellgateAuthLatencyHigh"]["expr"]


def test_alert_thresholds_and_class_hours_come_from_values(render):
    rules = _rules(render({"metrics": {"prometheusRule": {
        "enabled": True,
        "selector": 'service="gw"',
        "additionalLabels": {"team": "classroom-ops"},
        "authFailureRatio": {"threshold": 0.35, "for": "7m"},
        "authLatency": {"thresholdSeconds": 0.5},
        "eventRejections": {"threshold": 0.15, "window": "30m"},
        "clusterUnhealthy": {"enabled": False},
        "noDashboards": {"classHours": {"startHour": 9, "endHour": 16, "daysOfWeek": [1, 3],
                                        "utcOffsetHours": -5}},
    }}}))
    assert "CellgatePodNotClusterHealthy" not in rules
    assert ") > 0.35" in rules["CellgateAuthFailureRatioHigh"]["expr"]
    assert rules["CellgateAuthFailureRatioHigh"]["for"] == "7m"
    assert ") > 0.5" in rules["CellgateAuthLatencyHigh"]["expr"]
    assert ") > 0.15" in rules["CellgateEventRejectionsRising"]["expr"]
    assert "[30m]" in rules["CellgateEventRejectionsRising"]["expr"]
    assert 'cellgate_connected_sockets{service="gw"}' in rules["CellgateNoDashboardsDuringClassHours"]["expr"]
    assert all(r["labels"]["team"] == "classroom-ops" for r in rules.values())
    hours = rules["CellgateNoDashboardsDuringClassHours"]["expr"]
    now = "vector(time() - 18000)"
    assert f"hour({now}) >= 9" in hours
    assert f"hour({now}) < 16" in hours
    assert f"(day_of_week({now}) == 1 or day_of_week({now}) == 3)" in hours


def test_class_hours_must_be_in_order(chart):
    with pytest.raises(helm.HelmRenderError, match="startHour must be before endHour"):
        chart.render({"metrics": {"prometheusRule": {"noDashboards": {"classHours": {
            "startHour": 18, "endHour": 8}}}}}, name=RELEASE)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
@pytest.mark.parametrize("name", ["existing-secret-networkpolicy-values", "httproute-publickey-values"])
def test_alert_rules_pass_promtool(render, name, tmp_path):
    rule = render(values_of(name)).one("PrometheusRule")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------
# Refused combinations and NOTES.txt


@pytest.mark.parametrize(
    "values, message",
    [
        ({"secrets": {"existingSecret": "creds", "databaseUrl": "postgres://u:p@h/db"}}, "leave secrets"),
        ({"secrets": {"jwtSecret": "x" * 40}, "config": {"jwt": {"publicKey": {"secretName": "k"}}}},
         "choose one"),
        ({"ingress": {"enabled": True}, "httpRoute": {"enabled": True, "parentRefs": [{"name": "g"}]}},
         "through one of them"),
        ({"httpRoute": {"enabled": True}}, "parentRefs"),
        ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3},
          "secrets": {"redisUrl": "redis://r:6379"}}, "must not exceed"),
        ({"tls": {"caSecret": "ca", "caConfigMap": "ca"}}, "choose one"),
        ({"tls": {"redisCaKey": "ca.pem"}}, "set tls.caSecret or tls.caConfigMap"),
        ({"tls": {"caSecret": "ca", "redisCaKey": "ca.pem"}, "secrets": {"redisUrl": "redis://r:6379"}},
         "not rediss://"),
    ],
)
def test_inconsistent_values_are_refused_with_a_reason(chart, values, message):
    with pytest.raises(helm.HelmRenderError, match=message):
        chart.render(values, name=RELEASE)


@pytest.mark.parametrize("name", PROFILE_IDS)
def test_notes_tell_how_to_reach_the_gateway_and_mint_a_token(render, name):
    values = values_of(name)
    notes = render(values).notes
    exec_prefix = f"kubectl -n {NAMESPACE} exec deploy/{RELEASE} -- /usr/local/bin/cellgate"
    assert f"{exec_prefix} instructors add" in notes
    if values.get("config", {}).get("jwt", {}).get("publicKey", {}).get("secretName"):
        assert "identity provider" in notes
    else:
        assert f"{exec_prefix} token instructor ada@example.edu" in notes
    if values.get("ingress", {}).get("enabled"):
        assert "https://cellgate.example.edu" in notes
    elif values.get("httpRoute", {}).get("enabled"):
        assert "HTTPRoute" in notes and "cellgate.example.edu" in notes
    else:
        assert f"port-forward svc/{RELEASE}" in notes


def test_notes_warn_about_missing_settings(render):
    assert "WARNING: secrets.databaseUrl is empty" in render({}).notes
    assert "WARNING: no JWT key" in render({}).notes
    assert "WARNING" not in render(WITH_SECRETS).notes
