#!/usr/bin/env bash
# Podman as the container engine on a Debian 12 machine with no Docker engine (what .ci/run uses):
# the packages, and the two settings this kind of machine needs (measured, ../shared/NOTES.md):
# runc with cgroupfs (crun fails on hybrid cgroups) and no default ulimits (setting RLIMIT_NOFILE
# is not permitted). An existing /etc/containers/containers.conf is left as it is.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
PACKAGES=(podman podman-compose runc debootstrap)
missing=()
for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
conf=/etc/containers/containers.conf
if [ ! -e "$conf" ]; then
  mkdir -p /etc/containers
  cat >"$conf" <<'CONF'
# Written by deploy/podman-setup.sh.
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
CONF
fi
podman info --format '{{.Host.OCIRuntime.Name}} {{.Host.CgroupManager}}' >/dev/null
