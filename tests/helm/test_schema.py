"""values.schema.json: Helm itself refuses bad values before rendering anything."""

from __future__ import annotations

import json

import helm_python as helm
import pytest

from conftest import CHART, NAMESPACE, PROFILES, RELEASE

BAD_VALUES = [
    pytest.param({"replicaCount": "3"}, "/replicaCount", id="string-for-replicas"),
    pytest.param({"replicaCount": 1.5}, "/replicaCount", id="fraction-for-replicas"),
    pytest.param({"replicas": 3}, "'replicas' not allowed", id="unknown-top-level-key"),
    pytest.param({"config": {"drainSecs": -1}}, "/config/drainSecs", id="negative-drain-window"),
    pytest.param({"config": {"drainSeconds": 10}}, "'drainSeconds' not allowed", id="unknown-config-key"),
    pytest.param({"config": {"jwt": {"leeway": 30}}}, "'leeway' not allowed", id="unknown-jwt-key"),
    pytest.param({"config": {"logFormat": "xml"}}, "/config/logFormat", id="unknown-log-format"),
    pytest.param({"config": {"maxBodyBytes": "512k"}}, "/config/maxBodyBytes", id="string-for-body-limit"),
    pytest.param({"config": {"allowedOrigins": ["dash.example.edu"]}}, "/config/allowedOrigins/0",
                 id="origin-without-scheme"),
    pytest.param({"config": {"trustedProxies": ["lb.internal"]}}, "/config/trustedProxies/0",
                 id="proxy-by-name"),
    pytest.param({"config": {"limits": {"maxSockets": 0}}}, "/config/limits/maxSockets",
                 id="no-room-for-a-dashboard"),
    pytest.param({"secrets": {"databaseUrl": "mysql://u:p@h/db"}}, "/secrets/databaseUrl", id="not-postgres"),
    pytest.param({"secrets": {"redisURL": "redis://r"}}, "'redisURL' not allowed", id="misspelt-secret-key"),
    pytest.param({"secrets": {"redisUrl": "http://redis:6379"}}, "/secrets/redisUrl", id="not-redis"),
    pytest.param({"secrets": {"redisUrl": "https://redis.example:6380"}}, "/secrets/redisUrl",
                 id="https-is-not-rediss"),
    pytest.param({"tls": {"caSecret": "Private CA"}}, "/tls/caSecret", id="bad-ca-secret-name"),
    pytest.param({"tls": {"redisCaKey": "certs/ca.pem"}}, "/tls/redisCaKey", id="ca-key-with-a-slash"),
    pytest.param({"tls": {"caFile": "/ca.pem"}}, "'caFile' not allowed", id="unknown-tls-key"),
    pytest.param({"service": {"port": "80"}}, "/service/port", id="string-for-port"),
    pytest.param({"service": {"port": 70000}}, "/service/port", id="port-out-of-range"),
    pytest.param({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy", id="bad-pull-policy"),
    pytest.param({"securityContext": {"runAsUser": 0}}, "/securityContext/runAsUser", id="root-uid"),
    pytest.param({"ingress": {"enabled": "yes"}}, "/ingress/enabled", id="string-for-boolean"),
    pytest.param({"ingress": {"nginx": {"affinity": {"mode": "sticky"}}}}, "/ingress/nginx/affinity/mode",
                 id="bad-affinity-mode"),
    pytest.param({"ingress": {"nginx": {"timeoutSeconds": -5}}}, "/ingress/nginx/timeoutSeconds",
                 id="negative-timeout"),
    pytest.param({"autoscaling": {"minReplicas": 0}}, "/autoscaling/minReplicas", id="zero-min-replicas"),
    pytest.param({"lifecycle": {"preStopSleepSeconds": -1}}, "/lifecycle/preStopSleepSeconds",
                 id="negative-prestop"),
    pytest.param({"terminationGracePeriodSeconds": -30}, "/terminationGracePeriodSeconds",
                 id="negative-grace"),
    pytest.param({"metrics": {"prometheusRule": {"authFailureRatio": {"threshold": 20}}}},
                 "/metrics/prometheusRule/authFailureRatio/threshold", id="ratio-above-one"),
    pytest.param({"metrics": {"prometheusRule": {"authLatency": {"window": "five minutes"}}}},
                 "/metrics/prometheusRule/authLatency/window", id="bad-duration"),
    pytest.param({"metrics": {"prometheusRule": {"noDashboards": {"classHours": {"daysOfWeek": [7]}}}}},
                 "/metrics/prometheusRule/noDashboards/classHours/daysOfWeek", id="bad-weekday"),
    pytest.param({"metrics": {"serviceMonitor": {"enable": True}}}, "'enable' not allowed",
                 id="misspelt-enabled"),
    pytest.param({"httpRoute": {"sessionPersistence": {"lifetimeType": "Forever"}}},
                 "/httpRoute/sessionPersistence/lifetimeType", id="bad-lifetime-type"),
    pytest.param({"networkPolicy": {"metrics": {"namespace": "Monitoring!"}}}, "/networkPolicy/metrics/namespace",
                 id="bad-namespace-name"),
]


@pytest.mark.parametrize("values, where", BAD_VALUES)
def test_bad_values_are_refused_by_helm(chart, values, where):
    # The schema check Helm runs on install, upgrade and template…
    with pytest.raises(helm.HelmValuesError) as refused:
        chart.validate_schema(values)
    assert where in str(refused.value), str(refused.value)
    # …so nothing is rendered…
    with pytest.raises(helm.HelmValuesError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    # …and `helm lint` reports it as an error.
    report = helm.lint(CHART, values, namespace=NAMESPACE)
    assert any(m["severity"] == 3 and where in m["error"] for m in report["messages"]), report


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_good_values_pass(chart, name):
    chart.validate_schema(PROFILES[name])


GOOD_VALUES = [
    # The gateway has a TLS client for Redis since afe2821 (tests/e2e/tls.test.mjs).
    pytest.param({"secrets": {"redisUrl": "rediss://:pw@redis.example:6380/0"}}, id="rediss"),
    pytest.param({"secrets": {"redisUrl": "redis://redis.example:6379/0"}}, id="redis"),
    pytest.param({"secrets": {"databaseUrl": "postgres://u:p@db.example:5432/cellgate"
                                             "?sslmode=verify-full&sslrootcert=/etc/cellgate/ca/ca.pem"}},
                 id="postgres-verify-full"),
    pytest.param({"tls": {"caSecret": "cellgate-ca", "redisCaKey": "redis-ca.pem"}}, id="ca-secret"),
    pytest.param({"tls": {"caConfigMap": "cellgate-ca"}}, id="ca-configmap"),
]


@pytest.mark.parametrize("values", GOOD_VALUES)
def test_tls_values_pass(chart, values):
    chart.validate_schema(values)


def test_schema_covers_every_default_value(chart):
    """Each key of values.yaml is declared in the schema (so additionalProperties
    false never refuses a documented value), and the main objects are closed."""
    schema = chart.schema
    assert schema is not None

    def resolve(node):
        while "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
        return node

    def walk(values, node, path):
        node = resolve(node)
        if isinstance(values, dict) and "properties" in node:
            for key, value in values.items():
                assert key in node["properties"], f"{path}.{key} is not in values.schema.json"
                walk(value, node["properties"][key], f"{path}.{key}")

    walk(chart.values, schema, "")
    closed = ["", "image", "config", "config.jwt", "secrets", "service", "ingress", "ingress.nginx",
              "tls", "httpRoute", "autoscaling", "metrics", "metrics.prometheusRule", "networkPolicy",
              "migrations"]
    for path in closed:
        node = schema
        for part in filter(None, path.split(".")):
            node = resolve(node["properties"][part])
        assert node.get("additionalProperties") is False, f"{path or 'top level'} accepts unknown keys"


def test_values_yaml_comments_every_value():
    """Every value in values.yaml is explained by a comment: the line above it,
    or the comment of a block it belongs to (resources, an example list item)."""
    lines = (CHART / "values.yaml").read_text().splitlines()

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    def comment_above(i: int) -> list[str]:
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        block = []
        while j >= 0 and lines[j].strip().startswith("#"):
            block.append(lines[j].strip())
            j -= 1
        return block

    uncommented = []
    # (indent, documents its whole block) of the enclosing keys: a block whose
    # key has a "# --" comment is one documented value (helm-docs convention).
    stack: list[tuple[int, bool]] = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        level = indent(line)
        while stack and stack[-1][0] >= level:
            stack.pop()
        in_list = stripped.startswith("- ")
        _key, _, value = stripped.lstrip("- ").partition(":")
        documented = bool(comment_above(i)) or in_list or any(whole for _, whole in stack)
        if value.strip() and not documented:
            uncommented.append(f"{i + 1}: {line}")
        whole = in_list or any(c.startswith("# --") for c in comment_above(i))
        stack.append((level, whole))
    assert uncommented == [], "values without a comment:\n" + "\n".join(uncommented)


def test_schema_is_draft_07_and_helm_reads_it(chart):
    text = (CHART / "values.schema.json").read_text()
    schema = json.loads(text)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert chart.schema == schema
