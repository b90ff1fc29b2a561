#!/usr/bin/env bash
# Prints the mock cloud's topology (JSON) for a kind cluster.
#   topology.sh NODE_SUBNET POD_SUBNET < lines of "<node name> <node ip>"
# The node subnet is kind's docker network (the nodes' primary addresses); pods take their
# addresses from POD_SUBNET. Both make up the VNet's address space.
set -euo pipefail
node_subnet=${1:?usage: topology.sh NODE_SUBNET POD_SUBNET}
pod_subnet=${2:?usage: topology.sh NODE_SUBNET POD_SUBNET}

printf '{"subscription":"sub","resource_group":"rg","location":"local",\n'
printf ' "vnet":{"name":"vnet","address_space":["%s","%s"]},\n' "$node_subnet" "$pod_subnet"
printf ' "subnets":[{"name":"nodes","prefix":"%s"},{"name":"pods","prefix":"%s"}],\n' "$node_subnet" "$pod_subnet"
printf ' "vms":['
sep=""
while read -r name ip; do
    [[ -n ${name:-} ]] || continue
    printf '%s\n  {"name":"%s","subnet":"nodes","primary_ip":"%s"}' "$sep" "$name" "$ip"
    sep=","
done
printf ']}\n'
