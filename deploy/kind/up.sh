#!/usr/bin/env bash
# Brings up vnet-cni on a local kind cluster with the mock cloud:
#   build the image, create the cluster (default CNI disabled, two workers), load the image,
#   generate the mock cloud's topology from the real node IPs, install the CRD, RBAC, the mock cloud,
#   the kind fabric and the agent DaemonSet, then wait until every node is Ready.
# Needs docker, kind and kubectl. Idempotent: run it again after a code change to rebuild and roll out.
# Env: CLUSTER (default vnet-cni), IMAGE (default vnet-cni:dev), SKIP_BUILD=1 to reuse the image.
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${CLUSTER:-vnet-cni}
IMAGE=${IMAGE:-vnet-cni:dev}
NS=kube-system
POD_SUBNET=${POD_SUBNET:-10.250.0.0/16}

for tool in docker kind kubectl; do
    command -v "$tool" >/dev/null || { echo "up.sh: $tool is required (the path without Docker is 'vnetctl lab')" >&2; exit 1; }
done

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    echo "== building $IMAGE"
    docker build -f deploy/Dockerfile -t "$IMAGE" .
fi

if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    echo "== creating kind cluster $CLUSTER"
    kind create cluster --name "$CLUSTER" --config deploy/kind/kind-config.yaml --wait 0s
fi
kubectl config use-context "kind-$CLUSTER" >/dev/null
echo "== loading $IMAGE into the nodes"
kind load docker-image "$IMAGE" --name "$CLUSTER"

echo "== mock cloud topology"
node_subnet=$(docker network inspect kind -f '{{range .IPAM.Config}}{{.Subnet}} {{end}}' | tr ' ' '\n' | grep -v ':' | grep . | head -n1)
vms=$(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name} {.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}')
topology=$(mktemp)
trap 'rm -f "$topology"' EXIT
deploy/kind/topology.sh "$node_subnet" "$POD_SUBNET" <<<"$vms" >"$topology"
cat "$topology"
kubectl -n "$NS" create configmap vnet-mockcloud-topology --from-file=topology.json="$topology" \
    --dry-run=client -o yaml | kubectl apply -f -

echo "== installing vnet-cni"
kubectl apply -f deploy/crds/nodeippool.yaml
kubectl apply -f deploy/manifests/rbac.yaml
kubectl apply -f deploy/kind/agent-config.yaml
kubectl apply -f deploy/kind/mockcloud.yaml
kubectl apply -f deploy/kind/fabric.yaml
kubectl apply -f deploy/manifests/daemonset.yaml
kubectl -n "$NS" set image daemonset/vnet-cni-agent sysctls="$IMAGE" install-cni="$IMAGE" agent="$IMAGE"
# A rebuilt image under the same tag: make the pods pick it up.
kubectl -n "$NS" rollout restart deployment/vnet-mockcloud daemonset/vnet-kind-fabric daemonset/vnet-cni-agent

kubectl -n "$NS" rollout status deployment/vnet-mockcloud --timeout=180s
kubectl -n "$NS" rollout status daemonset/vnet-cni-agent --timeout=300s
kubectl wait --for=condition=Ready nodes --all --timeout=300s
kubectl get nodeippools
echo "vnet-cni is up on kind-$CLUSTER. Try: kubectl run web --image=nginx && kubectl get pods -o wide"
