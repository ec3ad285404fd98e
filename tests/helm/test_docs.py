"""The operator guide (docs/deploy-kubernetes.md) and the README's Kubernetes
section against the chart: every value they name exists in values.yaml, every
values file they show passes the schema, renders and validates, and every
object their commands name is one the chart makes."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from conftest import CHART, NAMESPACE, RELEASE, Rendered, deep_merge
from test_chart import KUBE_VERSIONS, validate_object

GUIDE = CHART.parents[1] / "docs" / "deploy-kubernetes.md"
README = CHART.parents[1] / "README.md"

VALUES = yaml.safe_load((CHART / "values.yaml").read_text())

# ```lang … ``` blocks: (lang, body)
_BLOCK = re.compile(r"^[ \t]*```(\w*)[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
# A chart values file shown in the docs starts with a comment naming it.
_VALUES_FILE = re.compile(r"^# ((?:cellgate-)?values[-\w]*\.yaml)")


def _readme_section() -> str:
    text = README.read_text()
    start = text.index("## Deploy on Kubernetes")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _docs() -> dict[str, str]:
    return {"guide": GUIDE.read_text(), "readme": _readme_section()}


def _blocks(text: str) -> list[tuple[str, str]]:
    return [(lang, _dedent(body)) for lang, body in _BLOCK.findall(text)]


def _dedent(body: str) -> str:
    lines = body.splitlines()
    indent = min((len(l) - len(l.lstrip()) for l in lines if l.strip()), default=0)
    return "\n".join(l[indent:] for l in lines) + "\n"


def _prose(text: str) -> str:
    return _BLOCK.sub("", text)


def _values_files(text: str) -> dict[str, dict[str, Any]]:
    files = {}
    for lang, body in _blocks(text):
        match = _VALUES_FILE.match(body)
        if lang == "yaml" and match:
            files[match.group(1)] = yaml.safe_load(body) or {}
    return files


def _resolves(path: str) -> bool:
    node: Any = VALUES
    for part in path.split("."):
        if part == "*":
            return isinstance(node, dict) and bool(node)
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


_PATH = re.compile(r"^[a-zA-Z]\w*(\.(\w+|\*))*$")


def _value_paths(text: str) -> set[str]:
    """Value paths named in `code spans` of the prose and in --set flags."""
    paths = set()
    for span in re.findall(r"`([^`\n]+)`", _prose(text)):
        first = re.split(r"[\s:=]", span.strip(), maxsplit=1)[0]
        if _PATH.match(first) and first.split(".")[0] in VALUES:
            paths.add(first)
    for _, body in _blocks(text):
        for path in re.findall(r"--set(?:-string|-file|-json)?[ =]([\w.]+)=", body):
            paths.add(path)
    return paths


def test_the_guide_exists_and_is_linked_from_the_chart_and_dockerfile():
    assert GUIDE.is_file()
    for where in (CHART / "values.yaml", CHART.parents[1] / "Dockerfile"):
        assert "docs/deploy-kubernetes.md" in where.read_text(), where
    assert "docs/deploy-kubernetes.md" in _readme_section()


@pytest.mark.parametrize("doc", ["guide", "readme"])
def test_every_value_named_exists_in_values_yaml(doc):
    paths = _value_paths(_docs()[doc])
    assert paths, "no value named at all: is the extraction broken?"
    missing = sorted(p for p in paths if not _resolves(p))
    assert missing == [], f"{doc} names values that values.yaml does not have: {missing}"


def test_value_path_extraction_catches_a_typo():
    assert not _resolves("ingress.nginx.afinity.enabled")
    assert _resolves("ingress.nginx.affinity.enabled")
    assert _value_paths("set `secrets.existingSecret: x` and\n```sh\nhelm install --set image.tag=1\n```\n") == {
        "secrets.existingSecret", "image.tag"}


def _guide_values_files() -> dict[str, dict[str, Any]]:
    return _values_files(_docs()["guide"])


def test_the_guide_shows_its_values_files():
    assert {"cellgate-values.yaml", "values-gateway-api.yaml", "values-monitoring.yaml",
            "values-netpol.yaml", "values-sso.yaml", "values-tls.yaml"} <= set(_guide_values_files())


def test_every_values_file_used_in_a_command_is_shown():
    for doc, text in _docs().items():
        shown = set(_values_files(_docs()["guide"])) | set(_values_files(text))
        for _, body in _blocks(text):
            for used in re.findall(r"(?:-f|--values)[ =](\S+\.yaml)", body):
                assert used in shown, f"{doc}: `-f {used}` but no such values file is shown"


def _combinations() -> dict[str, dict[str, Any]]:
    files = _guide_values_files()
    combos = {name: values for name, values in files.items()}
    # Layered the way an operator would: the first values file, then the
    # optional ones (the HTTPRoute one replaces the Ingress, so it goes alone).
    layered: dict[str, Any] = {}
    for name in ("cellgate-values.yaml", "values-sso.yaml", "values-monitoring.yaml", "values-netpol.yaml",
                 "values-tls.yaml"):
        layered = deep_merge(layered, files[name])
    combos["cellgate-values.yaml + sso + monitoring + netpol + tls"] = layered
    return combos


@pytest.mark.parametrize("name", sorted(_combinations()))
def test_values_files_of_the_guide_pass_the_schema_and_render(chart, name):
    values = _combinations()[name]
    chart.validate_schema(values)
    rendered = Rendered(chart.render(values, name=RELEASE, namespace=NAMESPACE))
    assert rendered.objects
    for obj in rendered.objects:
        for version in KUBE_VERSIONS:
            validate_object(obj, version)


def test_objects_named_in_commands_exist(chart):
    rendered = Rendered(chart.render(_guide_values_files()["cellgate-values.yaml"], name=RELEASE,
                                     namespace=NAMESPACE))
    hpa = Rendered(chart.render(deep_merge(_guide_values_files()["cellgate-values.yaml"],
                                           {"autoscaling": {"enabled": True}}),
                                name=RELEASE, namespace=NAMESPACE))
    names = {(o["kind"], o["metadata"]["name"]) for o in rendered.objects + hpa.objects}
    kinds = {"deploy": "Deployment", "deployment": "Deployment", "job": "Job", "svc": "Service",
             "hpa": "HorizontalPodAutoscaler"}
    seen = 0
    for doc, text in _docs().items():
        for _, body in _blocks(text):
            for line in body.splitlines():
                # Commands about the release (other namespaces hold the databases).
                if not line.lstrip().startswith(("kubectl", "helm")) or f"-n {NAMESPACE}" not in line:
                    continue
                for short, name in re.findall(r"\b(deploy|deployment|job|svc)/([a-z0-9-]+)", line):
                    assert (kinds[short], name) in names, f"{doc}: {line}"
                    seen += 1
                for name in re.findall(r"\bget hpa ([a-z0-9-]+)", line):
                    assert ("HorizontalPodAutoscaler", name) in names, f"{doc}: {line}"
    assert seen >= 5


def test_ca_paths_in_the_docs_are_where_the_chart_mounts_the_cas(chart):
    """sslrootcert= in a URL of the docs points into the directory where
    values-tls.yaml mounts the CA files, in the gateway pods and the migration Job."""
    rendered = Rendered(chart.render(_guide_values_files()["values-tls.yaml"], name=RELEASE,
                                     namespace=NAMESPACE))
    dirs = set()
    for workload in (rendered.deployment, rendered.job):
        volumes = {v["name"] for v in workload["spec"]["template"]["spec"]["volumes"]
                   if "configMap" in v or "secret" in v}
        for c in workload["spec"]["template"]["spec"]["containers"]:
            dirs |= {m["mountPath"] for m in c["volumeMounts"] if m["name"] in volumes and m["readOnly"]}
    ca_dir = "/etc/cellgate/ca"
    assert dirs == {ca_dir}
    assert rendered.one("ConfigMap")["data"]["CELLGATE_REDIS_CA_FILE"].startswith(ca_dir + "/")
    seen = 0
    for doc, text in _docs().items():
        for path in re.findall(r"sslrootcert=([^&\s`'\"]+)", text):
            assert path.startswith(ca_dir + "/") or path == "/path/to/ca.pem", f"{doc}: sslrootcert={path}"
            seen += 1
    assert seen >= 3
