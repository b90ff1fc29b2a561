#!/usr/bin/env bash
# Prints vnet-cni's manifests, rendered by kustomize from deploy/kustomization.yaml (the one place
# that names the image) with the image and agent settings given here:
#
#   deploy/render.sh [--image REF] [--client-id ID] [--component NAME]... [--uninstall]
#
#   --image REF       registry/name:tag or registry/name@sha256:... of the vnet-cni image
#                     (default: deploy/kustomization.yaml's)
#   --client-id ID    cloud.client_id in the agent's config: the managed identity it signs in as
#   --component NAME  a flavour under deploy/, e.g. kind (mock cloud, fabric, mock config)
#   --uninstall       only the uninstall DaemonSet (deploy/uninstall.yaml), with the same image
#
# Needs kubectl (its built-in kustomize, 1.27 or newer) or kustomize. Changes nothing in the
# repository: it works on a copy. Pipe the output to `kubectl apply -f -`.
set -euo pipefail
deploy=$(cd "$(dirname "$0")" && pwd)
die() { echo "render.sh: $*" >&2; exit 2; }

image= client_id= uninstall=0 components=()
while [[ $# -gt 0 ]]; do
    case $1 in
    --image) image=${2:?--image needs a value}; shift ;;
    --client-id) client_id=${2:?--client-id needs a value}; shift ;;
    --component) components+=("${2:?--component needs a value}"); shift ;;
    --uninstall) uninstall=1 ;;
    -h | --help) sed -n '2,14s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done

name= tag=
if [[ -n $image ]]; then
    # registry[:port]/path[:tag]: the tag is what follows the last colon after the last slash.
    last=${image##*/}
    if [[ $last == *:* ]]; then
        name=${image%:*} tag=${last##*:}
    else
        name=$image tag=latest
    fi
    [[ $name == */* && $name =~ ^[a-z0-9] ]] || die "--image $image: want a full reference, registry/name:tag"
    [[ $tag =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "--image $image: bad tag '$tag'"
fi
[[ -z $client_id || $client_id =~ ^[0-9a-fA-F-]{36}$ ]] || die "--client-id $client_id: want a GUID"
for component in "${components[@]}"; do
    [[ $component =~ ^[a-z0-9-]+$ && -f $deploy/$component/kustomization.yaml ]] ||
        die "--component $component: no deploy/$component/kustomization.yaml"
    grep -q '^kind: Component' "$deploy/$component/kustomization.yaml" ||
        die "--component $component: deploy/$component is not a kustomize Component"
done
(( uninstall == 0 || ${#components[@]} == 0 )) || die "--uninstall takes no --component"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -R "$deploy/." "$work/"
kustomization=$work/kustomization.yaml
grep -q '^images:$' "$kustomization" || die "deploy/kustomization.yaml has no images block"
if [[ -n $name ]]; then
    sed -i -e "/^images:/,\$ s|^\(    newName:\).*|\1 $name|" \
        -e "/^images:/,\$ s|^\(    newTag:\).*|\1 \"$tag\"|" "$kustomization"
fi
if [[ -n $client_id ]]; then
    sed -i "s|^client_id = .*|client_id = \"$client_id\"|" "$work/manifests/agent.toml"
fi
if (( uninstall )); then
    { printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n'
      printf 'resources:\n  - uninstall.yaml\n'
      sed -n '/^images:/,$p' "$kustomization"; } >"$work/uninstall.kustomization"
    mv "$work/uninstall.kustomization" "$kustomization"
fi
if (( ${#components[@]} )); then
    printf 'components:\n' >>"$kustomization"
    printf '  - %s\n' "${components[@]}" >>"$kustomization"
fi

if command -v kustomize >/dev/null; then
    kustomize build "$work"
elif command -v kubectl >/dev/null; then
    kubectl kustomize "$work"
else
    die "needs kubectl or kustomize"
fi
