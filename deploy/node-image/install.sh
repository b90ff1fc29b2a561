#!/bin/sh
# vnet-cni node installer: run from the unpacked release tarball (vnet-cni-<version>-linux-amd64/).
#
#   ./install.sh [install] [--destdir DIR] [--no-enable] [--no-start]
#   ./install.sh uninstall [--destdir DIR] [--purge]
#
# install    verifies every file against SHA256SUMS before touching anything, then installs binaries,
#            the unit, the sysctl drop-in and the helper atomically (temp file in the same directory,
#            fsync, rename); the reference loopback and portmap plugins into /opt/cni/bin only when
#            the node has none; writes /etc/vnet-cni/agent.toml, agent.env and the conflist template
#            only if absent;
#            enables vnet-agent.service; on a running systemd host (no destdir) starts it, or restarts
#            it if anything changed (this is the in-place upgrade). Running it twice changes nothing.
# uninstall  refuses while pods of vnet-cni run on the node (cordon and drain it first); stops the
#            agent; removes the conflist, the agent's nftables table and tombstone veths
#            (`vnet-agent uninstall`), then exactly what the install manifest lists; keeps the
#            allocation state in /var/lib/vnet-cni unless --purge, and keeps a config file the
#            operator edited unless --purge.
#
# --destdir DIR (or DESTDIR=DIR): install into a root file system (an image build); nothing is
#            started and the unit is enabled by creating the wants symlink directly.
# --no-enable: do not enable the unit.  --no-start: do not start or restart it (use in Packer builds
#            that run on a live VM: the agent must not allocate addresses for the build VM).
#
# Layout and rationale: docs/install-node-image.md (installed to /usr/local/share/doc/vnet-cni/).
set -eu
umask 022

readonly UNIT=vnet-agent.service
readonly BIN_DIR=/usr/local/bin
readonly CNI_BIN_DIR=/opt/cni/bin
readonly LIBEXEC_DIR=/usr/local/libexec/vnet-cni
readonly DOC_DIR=/usr/local/share/doc/vnet-cni
readonly UNIT_DIR=/etc/systemd/system
readonly WANTS_LINK=/etc/systemd/system/multi-user.target.wants/vnet-agent.service
readonly SYSCTL_FILE=/etc/sysctl.d/90-vnet-cni.conf
readonly CONF_DIR=/etc/vnet-cni
readonly CNI_CONF_DIR=/etc/cni/net.d
readonly CONFLIST_NAME=00-vnet-cni.conflist
# The name earlier releases used; it sorts after other CNIs' 05-/10- files. Migrated on upgrade.
readonly LEGACY_CONFLIST_NAME=10-vnet-cni.conflist
readonly STATE_DIR=/var/lib/vnet-cni
readonly RUN_DIR=/run/vnet-cni
readonly MANIFEST=/var/lib/vnet-cni/install-manifest

PKG_DIR=$(cd "$(dirname "$0")" && pwd)
ROOT=${DESTDIR:-}
COMMAND=install
ENABLE=1
START=1
PURGE=0

say() { printf 'vnet-cni install: %s\n' "$*"; }
die() {
    printf 'vnet-cni install: error: %s\n' "$*" >&2
    exit 1
}
usage() {
    sed -n '2,26s/^# \{0,1\}//p' "$0"
}

while [ $# -gt 0 ]; do
    case $1 in
    install | uninstall) COMMAND=$1 ;;
    --destdir) [ $# -ge 2 ] || die "--destdir needs a directory"; ROOT=$2; shift ;;
    --destdir=*) ROOT=${1#--destdir=} ;;
    --no-enable) ENABLE=0 ;;
    --no-start) START=0 ;;
    --purge) PURGE=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done

# "" means the running system; a destdir is made absolute and loses its trailing slashes.
if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
    [ "$ROOT" = / ] && ROOT=
fi
if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
    die "installing into / needs root (or pass --destdir DIR)"
fi
# Talk to systemd only on the running system it manages.
LIVE=0
if [ -z "$ROOT" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    LIVE=1
fi
IS_ROOT=0
[ "$(id -u)" -eq 0 ] && IS_ROOT=1

WORK=$(mktemp -d)
TEMP_FILES=
cleanup() {
    # A failed run leaves no half-written temp file next to an installed one.
    for f in $TEMP_FILES; do rm -f "$f"; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

sha256_of() { sha256sum "$1" | cut -d ' ' -f 1; }

# --- install ---------------------------------------------------------------------------------------

verify_package() {
    [ -f "$PKG_DIR/SHA256SUMS" ] || die "$PKG_DIR/SHA256SUMS is missing: not a release directory"
    if ! (cd "$PKG_DIR" && sha256sum --check --strict --quiet SHA256SUMS >"$WORK/check" 2>&1); then
        cat "$WORK/check" >&2
        die "checksum verification failed in $PKG_DIR: refusing to install anything"
    fi
    # Every file in the package must be listed: nothing unchecked ships with it.
    (cd "$PKG_DIR" && find . -type f ! -name SHA256SUMS | sed 's|^\./||' | sort) >"$WORK/present"
    awk '{ sub(/^\*/, "", $2); print $2 }' "$PKG_DIR/SHA256SUMS" | sort >"$WORK/listed"
    if ! cmp -s "$WORK/present" "$WORK/listed"; then
        diff "$WORK/listed" "$WORK/present" >&2 || true
        die "SHA256SUMS does not list exactly the package's files: refusing to install anything"
    fi
}

expected_sum() {
    sum=$(awk -v f="$1" '{ p = $2; sub(/^\*/, "", p) } p == f { print $1 }' "$PKG_DIR/SHA256SUMS")
    [ -n "$sum" ] || die "$1 is not listed in SHA256SUMS"
    printf '%s\n' "$sum"
}

# Lines of the previous manifest, so a re-run remembers what an earlier run created.
old_manifest_has() { # kind path
    [ -f "$WORK/old-manifest" ] && awk -v k="$1" -v p="$2" '$1 == k && $4 == p { f = 1 } END { exit !f }' "$WORK/old-manifest"
}
old_manifest_line() { # kind path
    awk -v k="$1" -v p="$2" '$1 == k && $4 == p { print; exit }' "$WORK/old-manifest"
}
record() { # kind mode sum path
    printf '%s %s %s %s\n' "$1" "$2" "$3" "$4" >>"$WORK/manifest"
}

# mkdir -p that records every directory it creates (and remembers the ones an earlier run created).
ensure_dir() { # absolute path inside the root, mode for a new last component
    # sh has no local variables: ed_ names keep the caller's (mode, path, ...) intact.
    ed_path=$1
    ed_mode=${2:-0755}
    ed_partial=
    for ed_component in $(printf '%s\n' "$ed_path" | tr '/' ' '); do
        ed_partial=$ed_partial/$ed_component
        if [ ! -d "$ROOT$ed_partial" ]; then
            [ ! -e "$ROOT$ed_partial" ] || die "$ROOT$ed_partial exists and is not a directory"
            if [ "$ed_partial" = "$ed_path" ]; then
                mkdir -m "$ed_mode" "$ROOT$ed_partial"
                record dir "$ed_mode" - "$ed_partial"
            else
                mkdir -m 0755 "$ROOT$ed_partial"
                record dir 0755 - "$ed_partial"
            fi
        elif old_manifest_has dir "$ed_partial"; then
            old_manifest_line dir "$ed_partial" >>"$WORK/manifest"
        fi
    done
}

owner_ok() {
    [ "$IS_ROOT" -eq 0 ] || [ "$(stat -c %u:%g "$1")" = 0:0 ]
}

# Copies a package file into place atomically; leaves an identical file alone (same content, mode
# and owner), so a second run does not even touch mtimes.
install_file() { # package-relative source, absolute destination, octal mode
    src=$1
    dst=$2
    mode=$3
    sum=$(expected_sum "$src")
    target=$ROOT$dst
    ensure_dir "$(dirname "$dst")"
    if [ -f "$target" ] && [ ! -L "$target" ] && [ "$(stat -c %a "$target")" = "${mode#0}" ] &&
        owner_ok "$target" && [ "$(sha256_of "$target")" = "$sum" ]; then
        record file "$mode" "$sum" "$dst"
        return
    fi
    tmp=$(mktemp "$(dirname "$target")/.$(basename "$dst").vnet-install.XXXXXX")
    TEMP_FILES="$TEMP_FILES $tmp"
    cp "$PKG_DIR/$src" "$tmp"
    chmod "$mode" "$tmp"
    [ "$IS_ROOT" -eq 0 ] || chown 0:0 "$tmp"
    # What lands is exactly what SHA256SUMS lists, even if the package changed since the check.
    [ "$(sha256_of "$tmp")" = "$sum" ] || die "$src changed while installing: refusing to install it"
    # Data on disk before the rename, so a crash never leaves an empty binary under the final name.
    sync "$tmp" 2>/dev/null || sync
    mv -f "$tmp" "$target"
    say "installed $dst"
    CHANGED=1
    record file "$mode" "$sum" "$dst"
}

# Writes a config file only when absent; an existing one (the operator's, or ours from an earlier
# run) is never touched.
install_config() { # package-relative source, absolute destination
    src=$1
    dst=$2
    target=$ROOT$dst
    ensure_dir "$(dirname "$dst")"
    if [ -e "$target" ] || [ -L "$target" ]; then
        if old_manifest_has config "$dst"; then
            old_manifest_line config "$dst" >>"$WORK/manifest"
        else
            say "kept existing $dst"
        fi
        return
    fi
    sum=$(expected_sum "$src")
    tmp=$(mktemp "$(dirname "$target")/.$(basename "$dst").vnet-install.XXXXXX")
    TEMP_FILES="$TEMP_FILES $tmp"
    cp "$PKG_DIR/$src" "$tmp"
    chmod 0644 "$tmp"
    [ "$IS_ROOT" -eq 0 ] || chown 0:0 "$tmp"
    [ "$(sha256_of "$tmp")" = "$sum" ] || die "$src changed while installing: refusing to install it"
    sync "$tmp" 2>/dev/null || sync
    mv -f "$tmp" "$target"
    say "wrote $dst"
    CHANGED=1
    record config 0644 "$sum" "$dst"
}

enable_unit() {
    if [ "$LIVE" -eq 1 ]; then
        systemctl enable --quiet "$UNIT"
    else
        # What `systemctl enable` does for WantedBy=multi-user.target, without a running systemd.
        ensure_dir "$(dirname "$WANTS_LINK")"
        link=$ROOT$WANTS_LINK
        if [ ! -L "$link" ] || [ "$(readlink "$link")" != "$UNIT_DIR/$UNIT" ]; then
            rm -f "$link"
            ln -s "$UNIT_DIR/$UNIT" "$link"
            say "enabled $UNIT"
            CHANGED=1
        fi
    fi
    record link - - "$WANTS_LINK"
}

# The reference plugins containerd and the conflist need (loopback for every sandbox, portmap
# chained after vnet-cni): installed when the node has none, kept up to date when we installed them,
# and never replacing the node's own.
install_plugin_if_absent() { # name
    ip_dst=$CNI_BIN_DIR/$1
    if { [ -e "$ROOT$ip_dst" ] || [ -L "$ROOT$ip_dst" ]; } && ! old_manifest_has file "$ip_dst"; then
        say "kept the node's own $ip_dst"
        return
    fi
    install_file "cni/$1" "$ip_dst" 0755
}

# Earlier releases installed the template as 10-vnet-cni.conflist: an unedited one goes (the new
# 00- template replaces it), an edited one becomes the new template, so the operator's edits stay.
migrate_legacy_template() {
    old=$CONF_DIR/$LEGACY_CONFLIST_NAME
    new=$CONF_DIR/$CONFLIST_NAME
    old_manifest_has config "$old" || return 0
    [ -f "$ROOT$old" ] || return 0
    old_sum=$(old_manifest_line config "$old" | cut -d ' ' -f 3)
    if [ "$(sha256_of "$ROOT$old")" = "$old_sum" ] || [ -e "$ROOT$new" ]; then
        rm -f "$ROOT$old"
        say "removed the old template $old"
    else
        mv -f "$ROOT$old" "$ROOT$new"
        # Recorded with the package's sum, so uninstall sees it as edited and keeps it.
        record config 0644 "$(expected_sum "etc/$CONFLIST_NAME")" "$new"
        say "renamed the edited template $old to $new"
    fi
    CHANGED=1
}

cmd_install() {
    verify_package
    if [ -f "$ROOT$MANIFEST" ]; then
        cp "$ROOT$MANIFEST" "$WORK/old-manifest"
    fi
    : >"$WORK/manifest"
    CHANGED=0

    ensure_dir "$STATE_DIR" 0700
    ensure_dir "$CNI_CONF_DIR"
    install_file bin/vnet-cni "$CNI_BIN_DIR/vnet-cni" 0755
    install_plugin_if_absent loopback
    install_plugin_if_absent portmap
    install_file bin/vnet-agent "$BIN_DIR/vnet-agent" 0755
    install_file bin/vnetctl "$BIN_DIR/vnetctl" 0755
    install_file libexec/publish-conflist "$LIBEXEC_DIR/publish-conflist" 0755
    install_file install.sh "$LIBEXEC_DIR/install.sh" 0755
    install_file VERSION "$DOC_DIR/VERSION" 0644
    install_file doc/install-node-image.md "$DOC_DIR/install-node-image.md" 0644
    install_file sysctl/90-vnet-cni.conf "$SYSCTL_FILE" 0644
    install_file systemd/vnet-agent.service "$UNIT_DIR/$UNIT" 0644
    install_config etc/agent.toml "$CONF_DIR/agent.toml"
    install_config etc/agent.env "$CONF_DIR/agent.env"
    migrate_legacy_template
    if ! grep -q " $CONF_DIR/$CONFLIST_NAME\$" "$WORK/manifest"; then
        install_config "etc/$CONFLIST_NAME" "$CONF_DIR/$CONFLIST_NAME"
    fi

    if [ "$LIVE" -eq 1 ] && [ "$CHANGED" -eq 1 ]; then
        systemctl daemon-reload
    fi
    if [ "$ENABLE" -eq 1 ]; then
        enable_unit
    elif [ -L "$ROOT$WANTS_LINK" ] && old_manifest_has link "$WANTS_LINK"; then
        old_manifest_line link "$WANTS_LINK" >>"$WORK/manifest"
    fi

    # Files an older release installed that this one does not ship.
    if [ -f "$WORK/old-manifest" ]; then
        awk '$1 == "file" { print $4 }' "$WORK/old-manifest" | while read -r stale; do
            if ! awk -v p="$stale" '$1 == "file" && $4 == p { f = 1 } END { exit !f }' "$WORK/manifest"; then
                rm -f "$ROOT$stale"
                say "removed $stale (no longer shipped)"
            fi
        done
    fi

    sort -u "$WORK/manifest" -o "$WORK/manifest"
    {
        echo "# vnet-cni install manifest: what install.sh created under this root (kind mode sha256 path)."
        echo "# \`$LIBEXEC_DIR/install.sh uninstall\` removes exactly these."
        cat "$WORK/manifest"
    } >"$WORK/manifest.new"
    if ! cmp -s "$WORK/manifest.new" "$ROOT$MANIFEST" 2>/dev/null; then
        tmp=$(mktemp "$ROOT$STATE_DIR/.install-manifest.XXXXXX")
        TEMP_FILES="$TEMP_FILES $tmp"
        cp "$WORK/manifest.new" "$tmp"
        chmod 0644 "$tmp"
        mv -f "$tmp" "$ROOT$MANIFEST"
    fi

    if [ "$LIVE" -eq 1 ] && [ "$START" -eq 1 ]; then
        if systemctl is-active --quiet "$UNIT"; then
            if [ "$CHANGED" -eq 1 ]; then
                # The in-place upgrade: new binaries are in place; pods keep running meanwhile.
                say "restarting $UNIT"
                systemctl restart "$UNIT"
            fi
        else
            say "starting $UNIT (waits until the agent is ready)"
            systemctl start "$UNIT"
        fi
    fi
    say "$(sed -n 1p "$PKG_DIR/VERSION") installed into ${ROOT:-/}"
}

# --- uninstall -------------------------------------------------------------------------------------

cmd_uninstall() {
    if [ ! -f "$ROOT$MANIFEST" ]; then
        say "no install manifest at ${ROOT:-/}$MANIFEST: nothing installed"
    else
        cp "$ROOT$MANIFEST" "$WORK/old-manifest"
    fi
    agent=$ROOT$BIN_DIR/vnet-agent
    if [ -z "$ROOT" ] && [ -x "$agent" ]; then
        # Pods of ours would be stuck terminating without the plugin and its conflist, and a purge
        # would let a reinstall reuse their addresses: refuse before touching anything.
        agent_config=
        [ ! -f "$CONF_DIR/agent.toml" ] || agent_config="--config $CONF_DIR/agent.toml"
        # shellcheck disable=SC2086 # agent_config is empty or two words
        rc=0
        "$agent" uninstall --check $agent_config || rc=$?
        case $rc in
        0) ;;
        3) die "not uninstalled: pods of vnet-cni still run here; cordon and drain the node first (see above)" ;;
        *) die "not uninstalled: vnet-agent uninstall --check failed (see above)" ;;
        esac
    fi
    was_active=0
    if [ "$LIVE" -eq 1 ]; then
        systemctl is-active --quiet "$UNIT" && was_active=1
        systemctl disable --now --quiet "$UNIT" 2>/dev/null || true
    fi
    if [ -z "$ROOT" ] && [ -x "$agent" ]; then
        # The node objects the agent and the plugin made: conflist, nftables table, tombstone veths.
        # shellcheck disable=SC2086
        if ! "$agent" uninstall $agent_config; then
            if [ "$was_active" -eq 1 ]; then
                systemctl enable --now --quiet "$UNIT" || true
            fi
            die "not uninstalled: vnet-agent uninstall refused or failed (see above); the agent was restarted"
        fi
    fi
    # The conflist the agent published (also under its old name): the runtime must not keep
    # calling a removed plugin.
    for name in "$CONFLIST_NAME" "$LEGACY_CONFLIST_NAME"; do
        published=$ROOT$CNI_CONF_DIR/$name
        if [ -f "$published" ] && grep -q '"vnet-cni"' "$published"; then
            rm -f "$published"
            say "removed $CNI_CONF_DIR/$name"
        fi
    done
    rm -f "$ROOT$STATE_DIR/published-conflist.sha256"
    if [ -f "$WORK/old-manifest" ]; then
        grep -v '^#' "$WORK/old-manifest" | while read -r kind _mode sum path; do
            target=$ROOT$path
            case $kind in
            file)
                [ ! -f "$target" ] || rm -f "$target"
                ;;
            link)
                [ ! -L "$target" ] || rm -f "$target"
                ;;
            config)
                [ -f "$target" ] || continue
                if [ "$PURGE" -eq 1 ] || [ "$(sha256_of "$target")" = "$sum" ]; then
                    rm -f "$target"
                else
                    say "kept $path: edited since install (uninstall --purge removes it)"
                    echo "$kind $_mode $sum $path" >>"$WORK/kept"
                fi
                ;;
            esac
        done
        rm -f "$ROOT$MANIFEST"
    fi
    if [ "$PURGE" -eq 1 ]; then
        # Also what an earlier uninstall kept (edited config) when its manifest is gone.
        rm -rf "$ROOT$STATE_DIR" "$ROOT$CONF_DIR"
        [ -n "$ROOT" ] || rm -rf "$RUN_DIR"
        say "purged $STATE_DIR and $CONF_DIR"
    fi
    # Directories the install created, deepest first; only the empty ones go (the state stays).
    if [ -f "$WORK/old-manifest" ]; then
        awk '$1 == "dir" { print $4 }' "$WORK/old-manifest" | sort -r | while read -r dir; do
            rmdir "$ROOT$dir" 2>/dev/null || true
        done
        # What stays (the state, an edited config, the directories holding them) is written back
        # next to the state, so a later `uninstall --purge` can still remove all of it.
        touch "$WORK/kept"
        if [ -d "$ROOT$STATE_DIR" ] || [ -s "$WORK/kept" ]; then
            if [ ! -d "$ROOT$STATE_DIR" ]; then
                mkdir -p "$ROOT${STATE_DIR%/*}"
                mkdir -m 0700 "$ROOT$STATE_DIR"
            fi
            awk '$1 == "dir"' "$WORK/old-manifest" | while read -r kind mode sum path; do
                [ ! -d "$ROOT$path" ] || echo "$kind $mode $sum $path" >>"$WORK/kept"
            done
            {
                echo "# vnet-cni: uninstalled; kept the state and what is listed here (uninstall --purge removes it)."
                sort -u "$WORK/kept"
            } >"$ROOT$MANIFEST"
        fi
    fi
    if [ "$LIVE" -eq 1 ]; then
        systemctl daemon-reload
    fi
    say "uninstalled from ${ROOT:-/}"
}

case $COMMAND in
install) cmd_install ;;
uninstall) cmd_uninstall ;;
esac
