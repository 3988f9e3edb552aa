#!/usr/bin/env bash
# Load benchmark against nginx on this machine (see benches/load/run.py for what runs).
# Installs what it needs (nginx, wrk, cmake), builds the release binaries, then runs
# the bounded scenarios (about two minutes). Extra arguments go to run.py; with
# `storage` first, benches/load/storage.py runs instead (public objects from moto_server).
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/deps build
missing=()
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The packaged nginx service is not wanted: the benchmark starts its own instances.
if command -v systemctl >/dev/null 2>&1; then systemctl stop nginx 2>/dev/null || true; fi
cargo build --release --locked --bin miosa-edge --example bare_proxy
if [ "${1:-}" = storage ]; then
  shift
  exec python3 benches/load/storage.py "$@"
fi
exec python3 benches/load/run.py "$@"
