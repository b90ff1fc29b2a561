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
# The lab e2e tests again on a mixed lab: node-1 a Uniform scale-set instance (the cold burst
# runs there), node-2 a Flexible member, node-3 a plain VM.
if [ "$#" -eq 0 ]; then
    VNET_E2E_NODE_KIND=uniform,flexible,vm cargo test -p vnet-lab --no-fail-fast \
        --test e2e_connectivity --test e2e_churn --test e2e_agent_crash --test e2e_cold_burst
fi
