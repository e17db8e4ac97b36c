#!/usr/bin/env bash
# The system package the tests need besides Python: a real Prometheus server (Debian's `prometheus`).
# Installs it with apt-get when missing (as root, or through passwordless sudo); else says how.
set -euo pipefail
command -v "${MTREC_PROMETHEUS:-prometheus}" >/dev/null 2>&1 && exit 0
if command -v apt-get >/dev/null 2>&1; then
  run=()
  if [ "$(id -u)" -ne 0 ]; then
    if sudo -n true 2>/dev/null; then run=(sudo -n); else run=(); fi
  fi
  if [ "$(id -u)" -eq 0 ] || [ ${#run[@]} -gt 0 ]; then
    echo "installing the Debian package prometheus (the tests run a real Prometheus server)" >&2
    export DEBIAN_FRONTEND=noninteractive
    if "${run[@]}" apt-get update -q >/dev/null && \
       "${run[@]}" apt-get install -y -q --no-install-recommends prometheus >/dev/null; then
      command -v "${MTREC_PROMETHEUS:-prometheus}" >/dev/null 2>&1 && exit 0
    fi
  fi
fi
echo "error: the tests need a Prometheus server binary on PATH (Debian/Ubuntu: sudo apt-get install prometheus;" >&2
echo "       elsewhere: a prometheus 2.x binary, or MTREC_PROMETHEUS=/path/to/prometheus)" >&2
exit 1
