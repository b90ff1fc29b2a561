#!/usr/bin/env bash
# The test suite: unit, integration, plugin-through-libcni and end-to-end lab tests. Run as root on
# Debian 12; installs its prerequisites first.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/tools/prepare.sh
export VNET_CNITOOL=${VNET_CNITOOL:-/usr/local/bin/cnitool}
# Binaries first: integration tests spawn vnet-agent, vnet-mockcloud, vnet-cni and vnetctl.
cargo build --workspace --bins
cargo test --workspace --no-fail-fast "$@"
