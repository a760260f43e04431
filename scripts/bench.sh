#!/usr/bin/env bash
# Runs the benchmark workloads (README, "Performance") on Dask distributed and on
# Flotilla, one after the other on this machine, and prints the ratios:
# bench/dask_compare.py. Loopback only; PyPI is needed once, for the venv.
#
#   scripts/bench.sh                      # W1,W2,W3,W6, median of 3 runs
#   scripts/bench.sh --runs 5 --json bench.json
#   scripts/bench.sh --workloads W1,W2,W3,W4,W6
#   scripts/bench.sh --dask-only          # no Flotilla binary needed
#
# Idempotent: the venv .venv-bench is made once, and pip runs again only when
# bench/requirements.txt changes. Builds nothing: run `cargo build --release`
# first (it needs target/release/flotilla, or the binary given by --flotilla).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-bench
requirements=bench/requirements.txt

flotilla=target/release/flotilla
dask_only=0
prev=
for arg in "$@"; do
    case "$arg" in
        --dask-only) dask_only=1 ;;
        --flotilla=*) flotilla="${arg#--flotilla=}" ;;
    esac
    if [ "$prev" = --flotilla ]; then flotilla="$arg"; fi
    prev="$arg"
done
if [ "$dask_only" = 0 ] && [ ! -x "$flotilla" ]; then
    echo "bench: $flotilla is missing: run \`cargo build --release\` first" >&2
    echo "bench: (or pass --dask-only to measure Dask alone)" >&2
    exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
    rm -rf "$venv"
    if ! python3 -m venv "$venv"; then
        rm -rf "$venv"
        # Debian ships venv's pip bootstrap separately.
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "bench: installing python3-venv" >&2
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            python3 -m venv "$venv"
        else
            echo "bench: python3 -m venv failed; install python3-venv" >&2
            exit 1
        fi
    fi
fi

if ! cmp -s "$requirements" "$venv/installed-requirements.txt"; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/installed-requirements.txt"
fi

export PYTHONDONTWRITEBYTECODE=1
exec "$venv/bin/python" bench/dask_compare.py "$@"
