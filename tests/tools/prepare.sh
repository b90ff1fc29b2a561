#!/usr/bin/env bash
# Installs what the demo and the tests need on a Debian 12 machine, as root. Idempotent: installs
# only what is missing, so a second run takes a second.
set -euo pipefail

[[ $(id -u) -eq 0 ]] || { echo "prepare: run as root (the lab and the tests create network namespaces)" >&2; exit 1; }
command -v cargo >/dev/null || {
    echo "prepare: cargo not found: install a Rust toolchain (1.89 or newer, e.g. with rustup) first" >&2
    exit 1
}

packages=(
    iproute2                     # ip: namespaces, veths, routes in tests and the lab
    nftables                     # the agent's masquerade rule
    iptables                     # portmap (chained reference plugin) programs iptables
    containernetworking-plugins  # reference plugins: ptp, host-local, portmap, bandwidth, tuning
    iperf3 iputils-ping          # data-path checks and benchmarks
    jq procps psmisc util-linux coreutils
    golang-go golang-github-appc-cni-dev dpkg-dev debian-archive-keyring  # to build cnitool
    binutils                     # strip, readelf: packaging the debug binaries small
    docker.io                    # tests/tests/image.rs: a private dockerd builds and runs the image
    containerd runc busybox-static  # tests/tests/containerd.rs: real containers on vnet-cni
    debootstrap systemd-container   # Debian trees: the image's base; the node image under systemd-nspawn
)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "prepare: installing ${missing[*]}" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

"$(dirname "$0")/build-cnitool.sh" >&2
