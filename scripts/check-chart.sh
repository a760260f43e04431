#!/usr/bin/env bash
# Lints and renders the Helm chart with Helm's own engine and validates every
# object, and the plain manifests in manifests/kubernetes, against the Kubernetes
# schemas: tests/helm. Offline apart from PyPI; no cluster, no helm binary.
#
# Idempotent: the venv .venv-chart is made once, and pip runs again only when
# tests/helm/requirements.txt changes.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-chart
requirements=tests/helm/requirements.txt

if [ ! -x "$venv/bin/python" ]; then
    rm -rf "$venv"
    if ! python3 -m venv "$venv"; then
        rm -rf "$venv"
        # Debian ships venv's pip bootstrap separately.
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "check-chart: installing python3-venv" >&2
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            python3 -m venv "$venv"
        else
            echo "check-chart: python3 -m venv failed; install python3-venv" >&2
            exit 1
        fi
    fi
fi

if ! cmp -s "$requirements" "$venv/installed-requirements.txt"; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/installed-requirements.txt"
fi

export PYTHONDONTWRITEBYTECODE=1
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/helm "$@"
