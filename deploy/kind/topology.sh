#!/usr/bin/env bash
# Prints the mock cloud's topology (JSON) for a kind cluster.
#   topology.sh NODE_SUBNET < lines of "<node name> <node ip>"
# The node subnet is kind's docker network (the nodes' primary addresses); it is the VNet's
# address space, and pods take their addresses from it too, as on Azure (one subnet per NIC).
set -euo pipefail
node_subnet=${1:?usage: topology.sh NODE_SUBNET}
[[ $# -eq 1 ]] || { echo "usage: topology.sh NODE_SUBNET (pods use the node subnet)" >&2; exit 2; }

printf '{"subscription":"sub","resource_group":"rg","location":"local",\n'
printf ' "vnet":{"name":"vnet","address_space":["%s"]},\n' "$node_subnet"
printf ' "subnets":[{"name":"nodes","prefix":"%s"}],\n' "$node_subnet"
printf ' "vms":['
sep=""
while read -r name ip; do
    [[ -n ${name:-} ]] || continue
    printf '%s\n  {"name":"%s","subnet":"nodes","primary_ip":"%s"}' "$sep" "$name" "$ip"
    sep=","
done
printf ']}\n'
