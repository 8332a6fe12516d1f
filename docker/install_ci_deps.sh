#!/usr/bin/env bash
# Debian packages for the container smoke test and the Prometheus dashboard test (root, idempotent):
# prometheus (+ promtool), podman, runc, debootstrap, curl. Does nothing when all are present.
set -euo pipefail
need=()
for pair in prometheus:/usr/bin/prometheus podman:/usr/bin/podman runc:/usr/sbin/runc \
  debootstrap:/usr/sbin/debootstrap curl:/usr/bin/curl; do
  [ -x "${pair#*:}" ] || need+=("${pair%%:*}")
done
if [ ${#need[@]} -eq 0 ]; then
  echo "install_ci_deps: prometheus podman runc debootstrap curl already installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_ci_deps: need root to apt-get install ${need[*]}" >&2
  exit 1
fi
echo "install_ci_deps: apt-get install ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${need[@]}" > /dev/null
# Debian's prometheus package may start its service where an init system runs; the tests start
# their own server on a free port and do not need it.
