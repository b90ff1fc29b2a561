#!/usr/bin/env bash
# The local VPC demo: a simulated VNet of network namespaces on this machine, a mock Azure, one
# vnet-agent per node, pods wired through libcni, connectivity checks, then tear-down.
# Run as root on Debian 12; extra arguments go to `vnetctl lab demo` (e.g. --keep, --nodes 4).
set -euo pipefail
cd "$(dirname "$0")/.."
tests/tools/prepare.sh
cargo build --release --bins
exec target/release/vnetctl lab demo "$@"
