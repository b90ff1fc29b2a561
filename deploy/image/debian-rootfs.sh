#!/usr/bin/env bash
# Makes a Debian root file system tarball from Debian's packages only (debootstrap), cached: the
# same suite, variant and package list give the same cache entry, rebuilt only when missing.
#
#   deploy/image/debian-rootfs.sh [--variant minbase] [--include pkg,pkg] [--cache-dir DIR] [--suite S]
#
# Prints the tarball's path as the last line of stdout. The cache (default /var/cache/vnet-cni-ci,
# env VNET_CI_CACHE) holds the downloaded .debs (debs/) and the tarballs (rootfs/); it lives outside
# any checkout so a fresh clone reuses it. The mirror is the first Debian archive in this machine's
# apt sources (override: env DEBIAN_MIRROR).
#
# Used by deploy/image/build.sh (the container image's base, imported with `docker import`) and by
# the tests (a systemd node tree for systemd-nspawn).
set -euo pipefail

variant=minbase
include=
suite=${DEBIAN_SUITE:-bookworm}
cache=${VNET_CI_CACHE:-/var/cache/vnet-cni-ci}
strip=0
die() { echo "debian-rootfs: error: $*" >&2; exit 1; }
while [[ $# -gt 0 ]]; do
    case $1 in
    --variant) variant=${2:?}; shift ;;
    --include) include=${2:?}; shift ;;
    --cache-dir) cache=${2:?}; shift ;;
    --suite) suite=${2:?}; shift ;;
    # Drop documentation, man pages, locales and apt's lists: an image needs none of them.
    --strip) strip=1 ;;
    -h | --help) sed -n '2,13s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
    esac
    shift
done
[[ $(id -u) -eq 0 ]] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"

mirror=${DEBIAN_MIRROR:-}
if [[ -z $mirror ]]; then
    mirror=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) {print $i; exit}}' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
fi
if [[ -z $mirror ]]; then
    mirror=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
fi
[[ -n $mirror ]] || die "no Debian archive in the apt configuration (set DEBIAN_MIRROR)"

key=$(printf '%s\n' "$suite" "$variant" "$include" "$strip" | sha256sum | cut -c1-16)
out=$cache/rootfs/$suite-$variant-$key.tar
if [[ -s $out ]]; then
    echo "debian-rootfs: cached $out" >&2
    echo "$out"
    exit 0
fi
mkdir -p "$cache/debs" "$cache/rootfs"
work=$(mktemp -d "$cache/rootfs/.build.XXXXXX")
trap 'umount -R "$work/root" 2>/dev/null || true; rm -rf "$work"' EXIT
echo "debian-rootfs: debootstrap $suite ($variant${include:+, $include}) from $mirror; takes minutes" >&2
args=(--variant="$variant" --cache-dir="$cache/debs")
[[ -z $include ]] || args+=(--include="$include")
if ! debootstrap "${args[@]}" "$suite" "$work/root" "$mirror" >"$work/log" 2>&1; then
    tail -n 30 "$work/log" >&2
    [[ ! -f $work/root/debootstrap/debootstrap.log ]] || tail -n 30 "$work/root/debootstrap/debootstrap.log" >&2
    die "debootstrap failed"
fi
root=$work/root
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log
if ((strip)); then
    rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
        "$root"/usr/share/locale/* "$root"/var/cache/debconf/*-old
fi
# Reproducible enough for a cache: fixed order and owners.
tar --sort=name --numeric-owner -C "$root" -cf "$work/rootfs.tar" .
mv -f "$work/rootfs.tar" "$out"
echo "debian-rootfs: wrote $out ($(du -h "$out" | cut -f1))" >&2
echo "$out"
