#!/usr/bin/env bash
# Builds `cnitool`, the reference CNI runtime client (a small main() over libcni, the library that
# containerd and CRI-O use), from Debian's packages only, so it works without any Go module proxy.
#
# Debian ships libcni's source in golang-github-appc-cni-dev (/usr/share/gocode) but not the
# cnitool command; its source comes from the matching Debian *source* package, fetched with a
# private apt configuration (the system's apt sources are left alone). It is then compiled in
# GOPATH mode against exactly the libcni the -dev package installed.
#
#   tests/tools/build-cnitool.sh                      # -> /usr/local/bin/cnitool
#   DEST=/some/where/cnitool tests/tools/build-cnitool.sh
#
# Idempotent: does nothing when DEST already exists and was built from the installed libcni.
set -euo pipefail

DEST=${DEST:-/usr/local/bin/cnitool}
GOCODE=/usr/share/gocode
NEEDED=(golang-go golang-github-appc-cni-dev dpkg-dev debian-archive-keyring)

have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
missing=()
for pkg in "${NEEDED[@]}"; do have_pkg "$pkg" || missing+=("$pkg"); done
if ((${#missing[@]})); then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi

libcni_version=$(dpkg-query -W -f='${Version}' golang-github-appc-cni-dev)
stamp="$DEST.version"
if [[ -x $DEST ]] && grep -qF "golang-github-appc-cni $libcni_version" "$stamp" 2>/dev/null; then
    echo "cnitool is up to date: $DEST ($libcni_version)"
    exit 0
fi

work=$(mktemp -d /tmp/vnet-cnitool.XXXXXX)
trap 'rm -rf "$work"' EXIT

# A deb-src entry for the same archive this machine's apt already uses.
archive=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) {print $i; exit}}' \
    /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
if [[ -z $archive ]]; then
    archive=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
fi
[[ -n $archive ]] || { echo "build-cnitool: no Debian archive found in the apt configuration" >&2; exit 1; }
codename=$(. /etc/os-release && echo "$VERSION_CODENAME")

mkdir -p "$work/lists/partial" "$work/parts" "$work/src"
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $archive $codename main" >"$work/sources.list"
apt_private=(apt-get -q -o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=$work/parts"
    -o "Dir::State::Lists=$work/lists" -o "APT::Sandbox::User=root")
"${apt_private[@]}" update >/dev/null
(cd "$work/src" && "${apt_private[@]}" source --download-only "golang-github-appc-cni=$libcni_version" >/dev/null)
# apt checked the files against the signed index; dpkg-source only lacks a developer keyring.
dpkg-source -x "$work"/src/golang-github-appc-cni_*.dsc "$work/cni" >"$work/dpkg-source.log" 2>&1 \
    || { cat "$work/dpkg-source.log" >&2; exit 1; }

mkdir -p "$(dirname "$DEST")"
GO111MODULE=off GOPATH=$GOCODE GOCACHE=$work/gocache GOFLAGS= GOPROXY=off CGO_ENABLED=0 \
    go build -trimpath -ldflags=-buildid= -o "$DEST.tmp" "$work/cni/cnitool/cnitool.go"
mv -f "$DEST.tmp" "$DEST"
echo "cnitool from golang-github-appc-cni $libcni_version, $(go version)" >"$stamp"
echo "built $DEST ($libcni_version)"
