"""The Dockerfile, checked without a Docker engine (none runs on this machine):
hadolint, its structure, and that it agrees with Cargo.toml, the sources and
the Helm chart. The image build itself is not run here."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from conftest import CHART, REPO

DOCKERFILE = REPO / "Dockerfile"


@pytest.fixture(scope="module")
def parsed() -> DockerfileParser:
    parser = DockerfileParser(fileobj=DOCKERFILE.open("rb"))
    parser.content  # noqa: B018 - parse now
    return parser


def _stages(parsed: DockerfileParser) -> list[list[dict]]:
    stages: list[list[dict]] = []
    for instruction in parsed.structure:
        if instruction["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _find(stage: list[dict], name: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == name]


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_build_with_locked_dependencies(parsed):
    stages = _stages(parsed)
    assert len(stages) == 2
    build_from = _find(stages[0], "FROM")[0]
    assert re.fullmatch(r"rust:\$\{RUST_VERSION\}-bookworm AS build", build_from), build_from
    runs = " ".join(_find(stages[0], "RUN"))
    assert "cargo build --release --locked" in runs
    runtime_from = _find(stages[1], "FROM")[0]
    assert runtime_from.startswith(("gcr.io/distroless/cc-debian12", "debian:bookworm-slim")), runtime_from
    copies = _find(stages[1], "COPY")
    assert copies == ["--from=build /out/cellgate /usr/local/bin/cellgate"]


def test_builder_rust_is_new_enough_for_cargo_toml(parsed):
    default = re.search(r"^ARG RUST_VERSION=([0-9.]+)$", DOCKERFILE.read_text(), re.M)
    assert default, "ARG RUST_VERSION=… with a default"
    wanted = re.search(r'^rust-version\s*=\s*"([0-9.]+)"', (REPO / "Cargo.toml").read_text(), re.M)
    assert wanted, "rust-version in Cargo.toml"

    def version(text: str) -> tuple[int, ...]:
        return tuple(int(p) for p in text.split("."))

    assert version(default.group(1)) >= version(wanted.group(1))


def test_runtime_is_non_root_and_runs_the_gateway(parsed):
    runtime = _stages(parsed)[-1]
    (user,) = _find(runtime, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root USER lets Kubernetes verify runAsNonRoot"
    assert json.loads(_find(runtime, "ENTRYPOINT")[0]) == ["/usr/local/bin/cellgate"]
    assert json.loads(_find(runtime, "CMD")[0]) == ["serve", "--profile", "production"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["securityContext"]["runAsUser"] == int(uid)
    assert values["securityContext"]["runAsGroup"] == int(gid)


def test_image_ports_match_the_chart(parsed):
    runtime = _stages(parsed)[-1]
    exposed = {int(p) for value in _find(runtime, "EXPOSE") for p in value.split()}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert exposed == {values["containerPorts"]["http"], values["containerPorts"]["metrics"]}
    env = parsed.envs
    assert env["CELLGATE_LISTEN_ADDR"] == f"0.0.0.0:{values['containerPorts']['http']}"
    assert env["CELLGATE_METRICS_ADDR"] == f"0.0.0.0:{values['containerPorts']['metrics']}"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves `path` out (Docker's rules: last match wins,
    `!` re-includes, `**` spans folders, a folder's exclusion covers its files)."""
    ignored = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        variants = [pattern] + ([pattern[3:]] if pattern.startswith("**/") else [])
        regexes = [fnmatch.translate(v) for v in variants]
        if any(re.match(r, c) for r in regexes for c in candidates):
            ignored = not negate
    return ignored


def test_build_context_holds_what_cargo_reads():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert _ignored("target/release/cellgate", patterns)
    assert _ignored(".git/HEAD", patterns)
    assert _ignored("tests/e2e/node_modules/socket.io-client/package.json", patterns)
    needed = ["Cargo.toml", "Cargo.lock", "src/main.rs", "src/lib.rs"]
    # Files the sources embed at compile time (sqlx::migrate!, include_str!, …).
    for source in (REPO / "src").rglob("*.rs"):
        text = source.read_text()
        for macro, arg in re.findall(r"(migrate|include_str|include_bytes)!\(\s*\"([^\"]+)\"", text):
            base = REPO if macro == "migrate" else source.parent
            target = (base / arg).resolve().relative_to(REPO)
            files = [p for p in (REPO / target).rglob("*") if p.is_file()] if (REPO / target).is_dir() else [
                REPO / target]
            assert files, f"{source}: {arg} is missing"
            needed += [str(p.relative_to(REPO)) for p in files]
    assert any(n.startswith("migrations/") for n in needed)
    for path in needed:
        assert not _ignored(path, patterns), f".dockerignore leaves out {path}, which the build needs"
