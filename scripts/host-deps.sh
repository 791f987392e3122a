#!/usr/bin/env bash
# The Debian packages the local cluster and the image builds need on this machine: buildah and
# skopeo (images without a daemon), mmdebstrap (the base root filesystem), libseccomp-dev and
# pkg-config (runc is built with seccomp), busybox-static (local-path-provisioner's helper
# image), iptables (kubelet and kube-proxy, inside the node's own network namespace), iproute2
# and util-linux (the namespace itself). Installs what is missing when run as root on Debian;
# otherwise prints the command and fails.
set -euo pipefail
packages=(buildah skopeo mmdebstrap libseccomp-dev pkg-config busybox-static iptables iproute2 util-linux gcc)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "host-deps: missing Debian packages: ${missing[*]}; install them with: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "host-deps: installing ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
