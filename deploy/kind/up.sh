#!/usr/bin/env bash
# Brings up vnet-cni on a local kind cluster with the mock cloud:
#   build the image (deploy/image/build.sh), create the kind docker network and the cluster (default CNI disabled, two
#   workers, kube-proxy's cluster CIDR = that network's subnet, where pods take their addresses
#   from), load the image, generate the mock cloud's topology from the real node IPs, then install
#   CRD, RBAC, mock cloud, kind fabric and agent from `deploy/render.sh --component kind` and wait
#   until every node is Ready.
# Needs docker, kind and kubectl. Idempotent: run it again after a code change to rebuild and roll out.
# Env: CLUSTER (default vnet-cni), IMAGE (default localhost/vnet-cni:dev: a full reference, fed
# into deploy/kustomization.yaml by render.sh), SKIP_BUILD=1 to reuse the image.
#   up.sh --print-kind-config SUBNET   only prints the kind config for that node subnet
set -euo pipefail
cd "$(dirname "$0")/../.."

# kind's config with the pod subnet written in: kube-proxy's --cluster-cidr (which traffic is
# the cluster's own) must be where pods get their addresses, and with vnet-cni that is the nodes'
# subnet, known only once the kind network exists.
kind_config() {
    local subnet=$1
    [[ $subnet =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+/[0-9]+$ ]] || { echo "up.sh: bad subnet '$subnet'" >&2; return 2; }
    sed "s|^networking:\$|networking:\n  podSubnet: \"$subnet\"|" deploy/kind/kind-config.yaml
}
if [[ ${1:-} == --print-kind-config ]]; then
    kind_config "${2:?usage: up.sh --print-kind-config SUBNET}"
    exit
fi

CLUSTER=${CLUSTER:-vnet-cni}
IMAGE=${IMAGE:-localhost/vnet-cni:dev}
NS=kube-system

for tool in docker kind kubectl; do
    command -v "$tool" >/dev/null || { echo "up.sh: $tool is required (the path without Docker is 'vnetctl lab')" >&2; exit 1; }
done

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    echo "== building $IMAGE"
    # The image's own build (a Debian base made locally, then deploy/Dockerfile): needs root and
    # debootstrap; see deploy/Dockerfile.
    deploy/image/build.sh --tag "$IMAGE"
fi

# kind reuses a network named "kind" when it exists; make it first so its subnet is known.
docker network inspect kind >/dev/null 2>&1 ||
    docker network create -d bridge -o com.docker.network.bridge.enable_ip_masquerade=true kind >/dev/null
node_subnet=$(docker network inspect kind -f '{{range .IPAM.Config}}{{.Subnet}} {{end}}' | tr ' ' '\n' | grep -v ':' | grep . | head -n1)
[[ -n $node_subnet ]] || { echo "up.sh: the kind network has no IPv4 subnet" >&2; exit 1; }

if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    echo "== creating kind cluster $CLUSTER (pods and nodes on $node_subnet)"
    config=$(mktemp)
    kind_config "$node_subnet" >"$config"
    kind create cluster --name "$CLUSTER" --config "$config" --wait 0s
    rm -f "$config"
fi
kubectl config use-context "kind-$CLUSTER" >/dev/null
echo "== loading $IMAGE into the nodes"
kind load docker-image "$IMAGE" --name "$CLUSTER"

echo "== mock cloud topology"
vms=$(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name} {.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}')
topology=$(mktemp)
trap 'rm -f "$topology"' EXIT
deploy/kind/topology.sh "$node_subnet" <<<"$vms" >"$topology"
cat "$topology"
kubectl -n "$NS" create configmap vnet-mockcloud-topology --from-file=topology.json="$topology" \
    --dry-run=client -o yaml | kubectl apply -f -

echo "== installing vnet-cni"
deploy/render.sh --image "$IMAGE" --component kind | kubectl apply -f -
# A rebuilt image under the same tag: make the pods pick it up.
kubectl -n "$NS" rollout restart deployment/vnet-mockcloud daemonset/vnet-kind-fabric daemonset/vnet-cni-agent

kubectl -n "$NS" rollout status deployment/vnet-mockcloud --timeout=180s
kubectl -n "$NS" rollout status daemonset/vnet-cni-agent --timeout=300s
kubectl wait --for=condition=Ready nodes --all --timeout=300s
kubectl get nodeippools
echo "vnet-cni is up on kind-$CLUSTER. Try: kubectl run web --image=nginx && kubectl get pods -o wide"
