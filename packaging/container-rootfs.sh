# shellcheck shell=bash
# packaging/container-rootfs.sh: the cached Debian 12 root that packaging/container.sh boots
# copies of (sourced by it, never run): debootstrap under a lock, from this host's mirror or
# Debian's, configured once into a quiet, self-contained image; a stamp says which package
# list and configuration it was built with, and a mismatch rebuilds it.
# The variables below are container.sh's, so shellcheck cannot see them assigned here.
# shellcheck disable=SC2154,SC2034,SC2120

# Debian mirrors to try, best first: $TUNEGATE_DEBIAN_MIRROR alone if set; else the main
# archive this (Debian) host's apt uses, then deb.debian.org.
_ct_mirrors() {
    if [[ -n ${TUNEGATE_DEBIAN_MIRROR:-} ]]; then
        echo "$TUNEGATE_DEBIAN_MIRROR"
        return
    fi
    if [[ -r /etc/os-release ]] && grep -qx 'ID=debian' /etc/os-release; then
        {
            # deb822 stanzas: Types has deb, not disabled, a suite without "-" (the main archive).
            local f
            for f in /etc/apt/sources.list.d/*.sources; do
                [[ -r $f ]] || continue
                awk 'function flush() { if (deb && on && main) for (i = 1; i <= nu; i++) print u[i];
                                         deb = 0; on = 1; main = 0; nu = 0 }
                     BEGIN { on = 1 }
                     /^[ \t]*$/ { flush(); next }
                     /^[ \t]*#/ { next }
                     tolower($1) == "types:" { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
                     tolower($1) == "enabled:" { if (tolower($2) == "no") on = 0 }
                     tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i !~ /-/) main = 1 }
                     tolower($1) == "uris:" { for (i = 2; i <= NF; i++) u[++nu] = $i }
                     END { flush() }' "$f"
            done
            # One-line style: deb [options] URI SUITE COMPONENTS...
            for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
                [[ -r $f ]] || continue
                sed -n 's/^[[:space:]]*deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\)[[:space:]]\+\([^[:space:]-]\+\)[[:space:]].*/\2/p' "$f"
            done
        } | grep -E '^(http|https|file)://' | grep -v -i security | sed 's,/*$,,'
    fi
    echo "http://deb.debian.org/debian"
}

_ct_stamp_text() {
    printf 'version=%s suite=%s arch=%s packages=%s\n' "$CT_ROOTFS_VERSION" "$CT_SUITE" \
        "$(uname -m)" "$(_ct_package_list)"
}

_ct_package_list() {
    local e=${TUNEGATE_ROOTFS_EXTRA:-}
    local -a extra=()
    read -ra extra <<<"${e//,/ }"
    printf '%s\n' "${CT_PACKAGES[@]}" "${extra[@]}" | sort -u | paste -sd, -
}

_ct_cache_valid() {
    [[ -x $CT_CACHE/rootfs/usr/lib/systemd/systemd && -r $CT_CACHE/stamp ]] &&
        [[ $(cat "$CT_CACHE/stamp") == "$(_ct_stamp_text)" ]]
}

_ct_check_cache_location() {
    local cache top
    cache=$(realpath -m "$CT_CACHE")
    top=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel 2>/dev/null) || return 0
    top=$(realpath -m "$top")
    if [[ $cache == "$top" || $cache == "$top"/* ]]; then
        _ct_err "the rootfs cache ($cache) is inside the repository; set TUNEGATE_ROOTFS_CACHE elsewhere"
        return 1
    fi
}

# Turns a fresh debootstrap into a quiet, self-contained container image.
_ct_configure_rootfs() {
    local root=${1:-} unit
    # It edits and empties directories under $root as root: never the host's own.
    [[ -n $root && $(realpath -m "$root") != / && -x $root/usr/lib/systemd/systemd ]] ||
        { _ct_err "_ct_configure_rootfs: '$root' is not a fresh rootfs"; return 1; }
    echo tunegate-ct >"$root/etc/hostname"
    cat >"$root/etc/hosts" <<'EOF'
127.0.0.1	localhost
127.0.1.1	tunegate-ct
::1		localhost ip6-localhost ip6-loopback
EOF
    # Empty: every fresh copy gets its own id (ct_new_root).
    : >"$root/etc/machine-id"
    # Nothing inside may reach out (the container has only a loopback anyway) or prompt on the
    # console; a timer firing during a test is noise.
    for unit in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
        e2scrub_reap.service fstrim.timer getty@tty1.service console-getty.service \
        systemd-firstboot.service; do
        ln -sfn /dev/null "$root/etc/systemd/system/$unit"
    done
    rm -f "$root"/etc/systemd/system/*.wants/{apt-daily.timer,apt-daily-upgrade.timer,dpkg-db-backup.timer,e2scrub_all.timer,fstrim.timer,e2scrub_reap.service,getty@tty1.service}
    # The package cache and lists: 100 MB that a container with no network cannot use.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/*
    mkdir -p "$root/var/lib/apt/lists/partial"
    rm -rf "$root"/tmp/* "$root"/var/log/*.log "$root"/debootstrap
}

# ---- the cache ------------------------------------------------------------------------------

# ct_build_rootfs [--force]: makes sure $CT_CACHE/rootfs is a pristine bookworm matching this
# script's package list; debootstraps it (under an exclusive lock) when it is not.
# Sets CT_BUILT=1 when it built, 0 when it reused the cache.
ct_build_rootfs() {
    local force=0
    [[ ${1:-} == --force ]] && force=1
    CT_BUILT=0
    _ct_require_root || return 1
    _ct_check_cache_location || return 1
    if [[ $force == 0 ]] && _ct_cache_valid; then
        _ct_ensure_tools 0 || return 1
        return 0
    fi
    _ct_ensure_tools 1 || return 1
    # An earlier version of this script kept the root itself in $CT_CACHE (with a .complete
    # marker): move it out of the way.
    if [[ -e $CT_CACHE/.complete || -d $CT_CACHE/usr ]]; then
        _ct_log "replacing a rootfs cache in the old layout at $CT_CACHE"
        mv "$CT_CACHE" "$CT_CACHE.old.$$" && _ct_rm_tree "$CT_CACHE.old.$$"
    fi
    mkdir -p "$CT_CACHE" || { _ct_err "cannot create the cache directory $CT_CACHE"; return 1; }
    local lockfd rc=0
    exec {lockfd}>"$CT_CACHE/.lock"
    if ! flock -w 1800 "$lockfd"; then
        exec {lockfd}>&-
        _ct_err "timed out waiting for another build of $CT_CACHE"
        return 1
    fi
    # Another process may have built it while we waited.
    if [[ $force == 1 ]] || ! _ct_cache_valid; then
        _ct_build_locked || rc=1
    fi
    exec {lockfd}>&-
    return "$rc"
}

_ct_build_locked() {
    local tmp="$CT_CACHE/rootfs.new" log="$CT_CACHE/debootstrap.log" mirror ok=0 start proxy='' drc
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg keyopt=()
    [[ -r $keyring ]] && keyopt=(--keyring="$keyring")
    # debootstrap fetches with wget, which reads http_proxy but not apt's configuration.
    if [[ -z ${http_proxy:-} ]] && command -v apt-config >/dev/null; then
        eval "$(apt-config shell proxy Acquire::http::Proxy 2>/dev/null)"
        [[ -n $proxy && $proxy != DIRECT ]] && export http_proxy=$proxy
    fi
    start=$(_ct_now)
    while read -r mirror; do
        _ct_rm_tree "$tmp"
        _ct_log "debootstrap $CT_SUITE from $mirror into $CT_CACHE (packages: $(_ct_package_list))"
        drc=0
        timeout -k 30 "${TUNEGATE_DEBOOTSTRAP_TIMEOUT:-1500}" debootstrap --variant=minbase \
            --components=main "${keyopt[@]}" --include="$(_ct_package_list)" \
            "$CT_SUITE" "$tmp" "$mirror" >"$log" 2>&1 || drc=$?
        if [[ $drc == 0 ]]; then
            ok=1
            break
        fi
        [[ $drc == 124 ]] && _ct_log "debootstrap timed out (TUNEGATE_DEBOOTSTRAP_TIMEOUT=${TUNEGATE_DEBOOTSTRAP_TIMEOUT:-1500} s)"
        _ct_log "debootstrap from $mirror failed (exit $drc); last lines of $log:"
        tail -n 15 "$log" >&2
        [[ -r $tmp/debootstrap/debootstrap.log ]] && tail -n 15 "$tmp/debootstrap/debootstrap.log" >&2
    done < <(_ct_mirrors | awk '!seen[$0]++')
    _ct_umount_under "$tmp"
    if [[ $ok != 1 ]]; then
        _ct_rm_tree "$tmp"
        _ct_err "debootstrap failed from every mirror (set TUNEGATE_DEBIAN_MIRROR to one that works)"
        return 1
    fi
    _ct_configure_rootfs "$tmp" || { _ct_rm_tree "$tmp"; _ct_err "configuring the rootfs failed"; return 1; }
    rm -f "$CT_CACHE/stamp"
    _ct_rm_tree "$CT_CACHE/rootfs"
    mv "$tmp" "$CT_CACHE/rootfs" || return 1
    _ct_stamp_text >"$CT_CACHE/stamp.new" && mv "$CT_CACHE/stamp.new" "$CT_CACHE/stamp"
    CT_BUILT=1
    _ct_log "rootfs built in $(_ct_since "$start") s ($(du -sh "$CT_CACHE/rootfs" | cut -f1))"
}

# ct_new_root: a fresh, private copy of the cached rootfs for one boot; sets CT_ROOT (and
# CT_WORK, its parent, which ct_stop removes).
ct_new_root() {
    _ct_require_root || return 1
    _ct_cache_valid || { _ct_err "no valid rootfs in $CT_CACHE: run ct_build_rootfs (or '$0 build-rootfs') first"; return 1; }
    local base=${TUNEGATE_CT_WORKDIR:-/var/tmp} lockfd
    mkdir -p "$base" || return 1
    CT_WORK=$(mktemp -d "$base/tunegate-ct.XXXXXX") || { _ct_err "cannot create a work directory in $base"; return 1; }
    CT_ROOT_OWNED=1 # from here on ct_stop (a trap) removes CT_WORK
    # A shared lock: a rebuild (exclusive) cannot swap the tree out under the copy.
    exec {lockfd}>"$CT_CACHE/.lock"
    flock -s -w 600 "$lockfd" || { exec {lockfd}>&-; _ct_err "cache locked too long"; return 1; }
    if ! cp -a --reflink=auto "$CT_CACHE/rootfs" "$CT_WORK/root"; then
        exec {lockfd}>&-
        _ct_rm_tree "$CT_WORK"
        CT_WORK='' CT_ROOT_OWNED=''
        _ct_err "copying the rootfs failed (disk full?)"
        return 1
    fi
    exec {lockfd}>&-
    od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$CT_WORK/root/etc/machine-id"
    echo >>"$CT_WORK/root/etc/machine-id"
    CT_ROOT=$CT_WORK/root
    CT_ROOT_OWNED=1
}

# ct_copy_rootfs DEST: builds or reuses the cache, then makes DEST a fresh copy of it. DEST is
# the caller's: ct_stop does not remove it.
ct_copy_rootfs() {
    local dest=${1:?ct_copy_rootfs DEST} lockfd
    ct_build_rootfs || return 1
    [[ $(realpath -m "$dest") != "$(realpath -m "$CT_CACHE")"* ]] ||
        { _ct_err "ct_copy_rootfs: $dest is inside the cache"; return 1; }
    _ct_rm_tree "$dest"
    mkdir -p "$(dirname "$dest")" || return 1
    exec {lockfd}>"$CT_CACHE/.lock"
    flock -s -w 600 "$lockfd" || { exec {lockfd}>&-; _ct_err "cache locked too long"; return 1; }
    if ! cp -a --reflink=auto "$CT_CACHE/rootfs" "$dest"; then
        exec {lockfd}>&-
        _ct_rm_tree "$dest"
        _ct_err "copying the rootfs to $dest failed (disk full?)"
        return 1
    fi
    exec {lockfd}>&-
    od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$dest/etc/machine-id"
    echo >>"$dest/etc/machine-id"
}

# ct_rootfs: builds or reuses the cache; prints the pristine root's path (read it, never boot it).
ct_rootfs() {
    ct_build_rootfs >&2 || return 1
    echo "$CT_CACHE/rootfs"
}

