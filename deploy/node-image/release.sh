#!/usr/bin/env bash
# Builds the node-image release tarball: vnet-cni-<version>-linux-amd64.tar.gz with bin/ (vnet-cni,
# vnet-agent, vnetctl), cni/ (the reference loopback and portmap plugins, installed on nodes that
# have none), the agent.toml, agent.env and conflist templates, the systemd unit, the sysctl
# drop-in, the conflist publisher, install.sh, the docs and SHA256SUMS over every file.
#
#   deploy/node-image/release.sh [--out-dir DIR] [--bin-dir DIR] [--version VERSION]
#                                [--cni-plugins-dir DIR]
#
# --out-dir DIR  where the tarball and its .sha256 go (default: <cargo target dir>/dist).
# --bin-dir DIR  package prebuilt binaries from DIR instead of building (env VNET_RELEASE_BIN_DIR);
#                the tests use this with target/debug so they need no release build.
# --version V    override the version (env VNET_RELEASE_VERSION); default: the workspace version
#                and the git commit, e.g. 0.1.0-g1a2b3c4d (just 0.1.0 outside a git checkout).
# --cni-plugins-dir DIR  where loopback and portmap come from (env VNET_CNI_PLUGINS_DIR; default
#                /usr/lib/cni, Debian's containernetworking-plugins).
#
# The build links glibc statically (-C target-feature=+crt-static for x86_64-unknown-linux-gnu):
# see docs/install-node-image.md for why, and for the one caveat (NSS modules).
# Prints the tarball's path as the last line of stdout; progress goes to stderr.
set -euo pipefail

readonly TARGET=x86_64-unknown-linux-gnu
readonly BINARIES=(vnet-cni vnet-agent vnetctl)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

out_dir=
bin_dir=${VNET_RELEASE_BIN_DIR:-}
version=${VNET_RELEASE_VERSION:-}
cni_plugins_dir=${VNET_CNI_PLUGINS_DIR:-/usr/lib/cni}
readonly CNI_PLUGINS=(loopback portmap)

die() {
    echo "release.sh: error: $*" >&2
    exit 1
}
log() { echo "release.sh: $*" >&2; }

while [[ $# -gt 0 ]]; do
    case $1 in
    --out-dir) out_dir=${2:?--out-dir needs a directory}; shift ;;
    --out-dir=*) out_dir=${1#*=} ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift ;;
    --bin-dir=*) bin_dir=${1#*=} ;;
    --version) version=${2:?--version needs a value}; shift ;;
    --version=*) version=${1#*=} ;;
    --cni-plugins-dir) cni_plugins_dir=${2:?--cni-plugins-dir needs a directory}; shift ;;
    --cni-plugins-dir=*) cni_plugins_dir=${1#*=} ;;
    -h | --help) sed -n '2,22s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done

cd "$repo"
# No jq on a bare build machine: the two fields are plain JSON strings.
metadata=$(timeout 120 cargo metadata --no-deps --format-version 1)
target_dir=$(sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p' <<<"$metadata")
[[ -n $target_dir ]] || die "cannot find the cargo target directory"
# Read once: the build takes minutes and HEAD may move meanwhile.
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
mtime=$(git log -1 --format=%ct "$commit" 2>/dev/null || echo 0)
if [[ -z $version ]]; then
    # "path+file:///...#vnet-agent@0.1.0" (or "...#0.1.0" from older cargo)
    crate_version=$(timeout 120 cargo pkgid -p vnet-agent | sed 's/.*[#@]//')
    version=$crate_version
    [[ $commit == unknown ]] || version="$crate_version-g${commit:0:8}"
fi
[[ $version =~ ^[A-Za-z0-9._+-]+$ ]] || die "version '$version' has characters unfit for a file name"
out_dir=${out_dir:-$target_dir/dist}

if [[ -z $bin_dir ]]; then
    # Build only what ships (vnet-mockcloud is a test tool). The explicit --target keeps build
    # scripts and proc macros dynamically linked, which they must be.
    log "building ${BINARIES[*]} (release, static glibc); this takes minutes"
    RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
        cargo build --release --locked --target "$TARGET" -p vnet-cni -p vnet-agent -p vnet-lab --bins >&2
    bin_dir=$target_dir/$TARGET/release
    origin=release-build
else
    log "packaging prebuilt binaries from $bin_dir"
    origin=prebuilt
fi
for bin in "${BINARIES[@]}"; do
    [[ -x $bin_dir/$bin ]] || die "$bin_dir/$bin is missing or not executable"
done
for plugin in "${CNI_PLUGINS[@]}"; do
    [[ -x $cni_plugins_dir/$plugin ]] ||
        die "$cni_plugins_dir/$plugin is missing (apt-get install containernetworking-plugins, or pass --cni-plugins-dir)"
done

name="vnet-cni-$version-linux-amd64"
stage_root=$(mktemp -d)
trap 'rm -rf "$stage_root"' EXIT
stage=$stage_root/$name
mkdir -p "$stage"/{bin,cni,etc,systemd,sysctl,libexec,doc}

for bin in "${BINARIES[@]}"; do
    install -m 0755 "$bin_dir/$bin" "$stage/bin/$bin"
done
install -m 0644 "$here/agent.toml" "$stage/etc/agent.toml"
for plugin in "${CNI_PLUGINS[@]}"; do
    install -m 0755 "$cni_plugins_dir/$plugin" "$stage/cni/$plugin"
done
install -m 0644 "$here/agent.env" "$stage/etc/agent.env"
install -m 0644 "$here/00-vnet-cni.conflist" "$stage/etc/00-vnet-cni.conflist"
install -m 0644 "$here/vnet-agent.service" "$stage/systemd/vnet-agent.service"
install -m 0644 "$here/90-vnet-cni.conf" "$stage/sysctl/90-vnet-cni.conf"
install -m 0755 "$here/publish-conflist" "$stage/libexec/publish-conflist"
install -m 0755 "$here/install.sh" "$stage/install.sh"
install -m 0644 "$repo/docs/install-node-image.md" "$stage/doc/install-node-image.md"

# static, dynamic (needs a program interpreter, i.e. ld.so and shared libraries) or not-elf.
linkage() {
    if [[ $(head -c 4 "$1" | od -An -c | tr -d ' ') != '177ELF' ]]; then
        echo not-elf
    elif ! command -v readelf >/dev/null; then
        echo unknown
    elif LC_ALL=C readelf --program-headers "$1" 2>/dev/null | grep -q 'INTERP'; then
        echo dynamic
    else
        echo static
    fi
}

# Say what was linked how, so an operator can tell a static release from a test package.
{
    echo "vnet-cni $version"
    echo "commit $commit"
    echo "target $TARGET"
    for bin in "${BINARIES[@]}"; do
        if [[ $origin == release-build && $(linkage "$stage/bin/$bin") != static ]]; then
            die "$bin is not statically linked: the release promises self-contained binaries"
        fi
    done
    for bin in "${BINARIES[@]}"; do
        echo "$bin $(linkage "$stage/bin/$bin") ($origin)"
    done
    # The reference plugins are whatever the build machine's packages ship (Debian's are linked
    # against glibc dynamically); say where they came from.
    plugins_pkg=$(dpkg-query -S "$cni_plugins_dir/portmap" 2>/dev/null | cut -d: -f1 || true)
    plugins_version=
    [[ -z $plugins_pkg ]] || plugins_version=$(dpkg-query -W -f='${Version}' "$plugins_pkg" 2>/dev/null || true)
    for plugin in "${CNI_PLUGINS[@]}"; do
        echo "cni/$plugin $(linkage "$stage/cni/$plugin") (${plugins_pkg:-$cni_plugins_dir}${plugins_version:+ $plugins_version})"
    done
} >"$stage/VERSION"
chmod 0644 "$stage/VERSION"

(cd "$stage" && find . -type f | sed 's|^\./||' | LC_ALL=C sort | xargs sha256sum) >"$stage_root/SHA256SUMS"
mv "$stage_root/SHA256SUMS" "$stage/SHA256SUMS"
chmod 0644 "$stage/SHA256SUMS"

# Reproducible archive: fixed order, owner and mtime (the commit's time).
mkdir -p "$out_dir"
tarball=$out_dir/$name.tar.gz
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$mtime" -C "$stage_root" -cf - "$name" |
    gzip -n >"$tarball.tmp"
mv -f "$tarball.tmp" "$tarball"
(cd "$out_dir" && sha256sum "$name.tar.gz" >"$name.tar.gz.sha256")
log "wrote $tarball and $name.tar.gz.sha256"
echo "$tarball"
