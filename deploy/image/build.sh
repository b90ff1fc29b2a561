#!/usr/bin/env bash
# Builds the vnet-cni container image with no registry access: a Debian base made locally
# (debian-rootfs.sh + `docker import`), then deploy/Dockerfile over a context of the binaries.
#
#   deploy/image/build.sh [--bin-dir DIR] [--tag TAG] [--version V]
#
# --bin-dir DIR  take vnet-cni, vnet-agent, vnetctl (and vnet-mockcloud, vnet-allocator, if
#                there) from DIR; default: a release build (deploy/node-image/release.sh's static
#                binaries, plus vnet-mockcloud and vnet-allocator built the same way). The tests
#                pass their debug binaries.
# --tag TAG      image name (default vnet-cni:<version>).
# --version V    the image's version label (default: the workspace version).
# DOCKER         the docker client to use (default: docker); DOCKER_HOST selects the engine.
#
# Prints the tag as the last line of stdout.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
docker=${DOCKER:-docker}
bin_dir=
tag=
version=
die() { echo "image build: error: $*" >&2; exit 1; }
log() { echo "image build: $*" >&2; }
while [[ $# -gt 0 ]]; do
    case $1 in
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift ;;
    --tag) tag=${2:?--tag needs a name}; shift ;;
    --version) version=${2:?--version needs a value}; shift ;;
    -h | --help) sed -n '2,14s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done
if [[ -z $version ]]; then
    version=$(cd "$repo" && timeout 120 cargo pkgid -p vnet-agent | sed 's/.*[#@]//')
fi
tag=${tag:-vnet-cni:$version}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
context=$work/context
mkdir -p "$context/bin"

if [[ -z $bin_dir ]]; then
    log "release build of the binaries (takes minutes)"
    tarball=$("$repo/deploy/node-image/release.sh" --out-dir "$work/dist" | tail -n 1)
    tar -xzf "$tarball" -C "$work"
    bin_dir=$(echo "$work"/vnet-cni-*-linux-amd64/bin)
    (cd "$repo" && RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
        cargo build --release --locked --target x86_64-unknown-linux-gnu -p vnet-mockcloud -p vnet-allocator --bins >&2)
    cp "$repo/target/x86_64-unknown-linux-gnu/release/vnet-mockcloud" "$bin_dir/"
    cp "$repo/target/x86_64-unknown-linux-gnu/release/vnet-allocator" "$bin_dir/"
fi
for bin in vnet-cni vnet-agent vnetctl; do
    [[ -x $bin_dir/$bin ]] || die "$bin_dir/$bin is missing or not executable"
    install -m 0755 "$bin_dir/$bin" "$context/bin/$bin"
done
if [[ -x $bin_dir/vnet-mockcloud ]]; then
    install -m 0755 "$bin_dir/vnet-mockcloud" "$context/bin/vnet-mockcloud"
else
    log "no vnet-mockcloud in $bin_dir: the image will not serve deploy/kind's mock cloud"
fi
# Cluster mode's allocator (deploy/cluster-mode).
if [[ -x $bin_dir/vnet-allocator ]]; then
    install -m 0755 "$bin_dir/vnet-allocator" "$context/bin/vnet-allocator"
else
    log "no vnet-allocator in $bin_dir: the image will not run deploy/cluster-mode's allocator"
fi
install -m 0755 "$here/install-cni" "$context/install-cni"
cp "$repo/deploy/Dockerfile" "$context/Dockerfile"

# The base: Debian's packages only, cached outside the checkout; imported once per recipe.
rootfs=$("$here/debian-rootfs.sh" --include ca-certificates,nftables,containernetworking-plugins,procps,iproute2,wget --strip | tail -n 1)
base=vnet-cni-base:$(basename "$rootfs" .tar | sed 's/^bookworm-minbase-//')
if ! "$docker" image inspect "$base" >/dev/null 2>&1; then
    log "importing $rootfs as $base"
    "$docker" import "$rootfs" "$base" >&2
fi
log "building $tag from $base"
# --network=none: the Dockerfile has no RUN step, and the build must not reach out anyway.
"$docker" build --network=none --build-arg "BASE=$base" --build-arg "VERSION=$version" \
    -t "$tag" "$context" >&2
echo "$tag"
