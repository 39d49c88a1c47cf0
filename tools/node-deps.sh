#!/usr/bin/env bash
# Installs the Debian packages the local cluster's real node needs (containerd, runc, the CNI
# plugins) and those that build its images (debootstrap, gcc for the pause binary), when missing.
set -euo pipefail
packages=(containerd runc containernetworking-plugins debootstrap iproute2 gcc libc6-dev)
log() { printf '[node-deps %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  log "all present: ${packages[*]}"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  log "missing ${missing[*]}: install them as root (apt-get install ${missing[*]})"
  exit 1
fi
log "apt-get install ${missing[*]}"
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
log "done"
