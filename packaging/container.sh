#!/usr/bin/env bash
# packaging/container.sh: a throwaway Debian 12 (bookworm) with a real systemd as PID 1, booted
# with systemd-nspawn and driven through nsenter, for the package test of issue 7.
#
# As a command (root):
#   packaging/container.sh build-rootfs [--force]   debootstrap the cached pristine rootfs
#   packaging/container.sh boot [DIR]               boot DIR (default: a fresh copy of the cache)
#                                                   in the background; prints the machine name
#   packaging/container.sh exec NAME CMD...         run CMD inside a container booted by `boot`
#   packaging/container.sh stop NAME                stop it and remove what `boot` created
#   packaging/container.sh list                     containers booted and not yet stopped
#   packaging/container.sh gc                       stop those whose owner died (a killed run)
#   packaging/container.sh selftest                 build/reuse, boot, prove systemd works, stop
#
# As a library (one container per shell; call the functions directly, never in $(...), since
# they keep their state in shell variables):
#   source packaging/container.sh
#   ct_trap                    # EXIT/INT/TERM/HUP now stop the container (chains an EXIT trap)
#   ct_up                      # build or reuse the cache, boot a fresh copy, wait for systemd
#   ct_copy_in target/debian/tunegate.deb /root/tunegate.deb
#   ct_exec dpkg -i /root/tunegate.deb
#   ct_exec systemctl is-active tunegate
#   ct_sh 'journalctl -u tunegate --no-pager | tail -n 20'
#   ct_stop                    # also run by the trap; safe to call any number of times
# Lower level: ct_build_rootfs, ct_new_root (sets CT_ROOT; ct_stop removes it), ct_copy_rootfs
# DEST (a fresh copy at a path of yours; you remove it), ct_rootfs (prints the pristine root's
# path), ct_boot DIR [nspawn args...], ct_pid (the container's PID 1 as the host sees it),
# ct_copy_out, ct_log_tail, ct_attach NAME (adopt a container that `boot` started), ct_poll
# SECONDS CMD... (bounded waiting: every wait in these scripts goes through it). The cached root is
# built by packaging/container-rootfs.sh (sourced); the self-test is packaging/container-selftest.sh.
#
# Environment:
#   TUNEGATE_ROOTFS_CACHE     cache directory (default ~/.cache/tunegate/rootfs-bookworm); holds
#                             rootfs/ (pristine, never booted) and stamp. Keep it out of the repo.
#   TUNEGATE_DEBIAN_MIRROR    mirror for debootstrap (default: this host's Debian mirror from
#                             /etc/apt, then http://deb.debian.org/debian)
#   TUNEGATE_ROOTFS_EXTRA     extra packages for the rootfs (comma or space separated)
#   TUNEGATE_CT_WORKDIR       where fresh copies go (default /var/tmp)
#   TUNEGATE_CT_BOOT_TIMEOUT  seconds to wait for systemd inside (default 60)
#   TUNEGATE_CT_STOP_TIMEOUT  seconds to wait for a clean poweroff (default 30)
#   CT_EXEC_TIMEOUT           seconds one ct_exec may run (default 300)
#   TUNEGATE_CT_KEEP_LOG=1    keep the console log after ct_stop (its path is printed)

# Scripts for inside the container and check expressions are single-quoted on purpose.
# shellcheck disable=SC2016

# ---------------------------------------------------------------------------------------------
# Configuration

CT_SUITE=bookworm
# Bump when the package list or _ct_configure_rootfs changes: the cache is rebuilt.
CT_ROOTFS_VERSION=1
CT_PACKAGES=(systemd systemd-sysv dbus iproute2 procps python3 curl adduser)
CT_CACHE=${TUNEGATE_ROOTFS_CACHE:-${HOME:-/root}/.cache/tunegate/rootfs-bookworm}
CT_RUNDIR=${TUNEGATE_CT_RUNDIR:-/run/tunegate-ct}
CT_INNER_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# State of this shell's container (ct_stop resets it).
CT_NAME='' CT_NSPAWN_PID='' CT_PID='' CT_PIDNS='' CT_ROOT='' CT_ROOT_OWNED='' CT_WORK='' CT_LOG='' CT_STATE=''
CT_OWNER=''
CT_CGROUPS=()

# ---------------------------------------------------------------------------------------------
# Helpers

_ct_log() { printf 'container: %s\n' "$*" >&2; }
# Prints only (returns 0, so that under the caller's set -e the cleanup after it still runs).
_ct_err() { printf 'container: error: %s\n' "$*" >&2; }
_ct_now() { printf '%s' "${EPOCHREALTIME:-$(date +%s.%N)}"; }
# Seconds since $1 (a _ct_now value), one decimal.
_ct_since() { awk -v a="$1" -v b="$(_ct_now)" 'BEGIN { printf "%.1f", b - a }'; }

# ct_poll SECONDS CMD...: runs CMD every 0.1 s until it succeeds (returns 0) or SECONDS have
# passed (returns 1). Every wait in this file and in its users is bounded through it.
ct_poll() {
    local tenths=$(($1 * 10)) i
    shift
    for ((i = 0; i < tenths; i++)); do
        "$@" && return 0
        sleep 0.1
    done
    return 1
}

_ct_require_root() {
    [[ ${EUID:-$(id -u)} -eq 0 ]] || { _ct_err "must run as root (debootstrap, systemd-nspawn and nsenter need it)"; return 1; }
}

# Installs what is missing: debootstrap (only for a build), systemd-nspawn, nsenter & co.
_ct_ensure_tools() {
    local need_debootstrap=${1:-0} pkgs=() tool
    [[ $need_debootstrap == 1 ]] && ! command -v debootstrap >/dev/null && pkgs+=(debootstrap)
    [[ $need_debootstrap == 1 && ! -r /usr/share/keyrings/debian-archive-keyring.gpg ]] && pkgs+=(debian-archive-keyring)
    command -v systemd-nspawn >/dev/null || pkgs+=(systemd-container)
    for tool in nsenter flock setsid; do
        command -v "$tool" >/dev/null || { pkgs+=(util-linux); break; }
    done
    command -v timeout >/dev/null || pkgs+=(coreutils)
    ((${#pkgs[@]} == 0)) && return 0
    command -v apt-get >/dev/null ||
        { _ct_err "missing ${pkgs[*]} and no apt-get to install them with; install them by hand"; return 1; }
    _ct_log "installing ${pkgs[*]} with apt-get"
    local aptlog
    aptlog=$(mktemp) || return 1
    if ! DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q --no-install-recommends \
        "${pkgs[@]}" >"$aptlog" 2>&1; then
        # A fresh machine may have no (or old) package lists.
        if ! { timeout 300 apt-get update -q && DEBIAN_FRONTEND=noninteractive timeout 600 \
            apt-get install -y -q --no-install-recommends "${pkgs[@]}"; } >"$aptlog" 2>&1; then
            tail -n 20 "$aptlog" >&2
            rm -f "$aptlog"
            _ct_err "apt-get could not install ${pkgs[*]}"
            return 1
        fi
    fi
    rm -f "$aptlog"
    for tool in systemd-nspawn nsenter flock setsid timeout; do
        command -v "$tool" >/dev/null || { _ct_err "$tool still missing after apt-get install"; return 1; }
    done
    if [[ $need_debootstrap == 1 ]]; then
        command -v debootstrap >/dev/null || { _ct_err "debootstrap still missing after apt-get install"; return 1; }
    fi
}

# Unmounts everything mounted at or below $1 (deepest first): debootstrap mounts /proc, /sys
# and may bind /dev into its target, and an interrupted run can leave them.
_ct_umount_under() {
    local dir mp
    dir=$(realpath -m "$1")
    awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo |
        sort -r | while read -r mp; do
            umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || true
        done
}

# rm -rf that never crosses into a mounted file system.
_ct_rm_tree() {
    [[ -n ${1:-} && $1 != / && -e $1 ]] || return 0
    _ct_umount_under "$1"
    rm -rf --one-file-system -- "$1" 2>/dev/null || rm -rf --one-file-system -- "$1"
}

# ---------------------------------------------------------------------------------------------
# The cached rootfs (ct_build_rootfs, ct_new_root, ct_copy_rootfs, ct_rootfs)

# shellcheck source=packaging/container-rootfs.sh
source "$(dirname "${BASH_SOURCE[0]}")/container-rootfs.sh"

# ---------------------------------------------------------------------------------------------
# cgroups. With --keep-unit systemd-nspawn runs the container in its own cgroup (it makes
# payload/ and supervisor/ below it) and does not ask systemd for a scope. Under a systemd host
# that cgroup is a delegated scope from systemd-run. Without one (PID 1 here is not systemd)
# we make a cgroup of our own in the hierarchies systemd uses: cgroup2, and the v1 name=systemd
# one on a hybrid host. Only those: no controller hierarchy is touched, so the limits this
# process runs under still apply to the container.

_ct_host_has_systemd() { [[ -d /run/systemd/system ]]; }

_ct_cgroup_prepare() {
    CT_CGROUPS=()
    _ct_host_has_systemd && return 0
    local mnt kind own dir
    while read -r mnt kind; do
        if [[ $kind == v2 ]]; then
            own=$(sed -n 's/^0::\(.*\)$/\1/p' /proc/self/cgroup)
        else
            own=$(sed -n 's/^[0-9]\+:name=systemd:\(.*\)$/\1/p' /proc/self/cgroup)
        fi
        # Inside a cgroup namespace our path may look like /../..: use the mount's root.
        [[ -z $own || $own == *..* ]] && own=/
        dir="$mnt${own%/}/tunegate-ct/$CT_NAME"
        mkdir -p "$dir" 2>/dev/null || {
            _ct_err "cannot create cgroup $dir (is $mnt writable?)"
            return 1
        }
        CT_CGROUPS+=("$dir")
    done < <(awk '{ for (i = 7; $i != "-"; i++); fs = $(i + 1); opts = $(i + 3)
                    if ($4 != "/") next
                    if (fs == "cgroup2") print $5, "v2"
                    else if (fs == "cgroup" && opts ~ /(^|,)name=systemd(,|$)/) print $5, "v1" }' \
        /proc/self/mountinfo)
    ((${#CT_CGROUPS[@]} > 0)) ||
        { _ct_err "no cgroup2 or name=systemd hierarchy is mounted; systemd in the container needs one"; return 1; }
}

_ct_cgroup_empty() { [[ -z $(find "$1" -name cgroup.procs -exec cat {} + 2>/dev/null) ]]; }

_ct_cgroup_cleanup() {
    local dir
    for dir in "${CT_CGROUPS[@]}"; do
        [[ -d $dir ]] || continue
        # Zombies of the container may take a moment to leave the cgroup.
        ct_poll 5 _ct_cgroup_empty "$dir" || true
        find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || true
        [[ -d $dir ]] && _ct_log "warning: could not remove cgroup $dir"
        rmdir "$(dirname "$dir")" 2>/dev/null || true # tunegate-ct/, if no other container uses it
    done
    CT_CGROUPS=()
}

# ---------------------------------------------------------------------------------------------
# Booting and driving a container

_ct_save_state() {
    mkdir -p "$CT_RUNDIR" || return 1
    declare -p CT_NAME CT_NSPAWN_PID CT_PID CT_PIDNS CT_ROOT CT_ROOT_OWNED CT_WORK CT_LOG \
        CT_OWNER CT_CGROUPS >"$CT_RUNDIR/$CT_NAME.state"
}

# "PID:STARTTIME" of process $1 (the start time tells a reused pid apart).
_ct_proc_id() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    read -ra stat <<<"$stat"
    echo "$1:${stat[19]}"
}

# Is the shell that booted the container still there? (True when it has no owner: `boot`.)
_ct_owner_alive() {
    [[ -z $CT_OWNER ]] && return 0
    [[ $(_ct_proc_id "${CT_OWNER%%:*}" 2>/dev/null) == "$CT_OWNER" ]]
}

# ct_attach NAME: take over a container booted by another process (the `boot` command).
ct_attach() {
    local f="$CT_RUNDIR/${1:?ct_attach NAME}.state"
    [[ -r $f ]] || { _ct_err "no container named $1 (no $f)"; return 1; }
    # shellcheck disable=SC1090
    source <(sed 's/^declare -a /declare -ga /; s/^declare -- /declare -g /' "$f")
}

# Is $1 the systemd-nspawn process of container $CT_NAME (not a reused pid)?
_ct_is_our_nspawn() {
    [[ -n ${1:-} && -r /proc/$1/cmdline ]] || return 1
    tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | grep -qx -e "--machine=$CT_NAME" -e "$CT_NAME"
}

_ct_nspawn_gone() { ! _ct_is_our_nspawn "$CT_NSPAWN_PID"; }

_ct_running() {
    [[ -n $CT_PID && -n $CT_PIDNS ]] && [[ $(readlink "/proc/$CT_PID/ns/pid" 2>/dev/null) == "$CT_PIDNS" ]]
}

# The container's init (PID 1 inside): the child of systemd-nspawn that runs systemd and whose
# innermost pid is 1.
_ct_find_init() {
    local c
    for c in $(pgrep -P "$CT_NSPAWN_PID" 2>/dev/null); do
        [[ $(cat "/proc/$c/comm" 2>/dev/null) == systemd ]] || continue
        [[ $(awk '/^NSpid:/ { print $NF }' "/proc/$c/status" 2>/dev/null) == 1 ]] || continue
        echo "$c"
        return 0
    done
    return 1
}

# ct_boot DIR [extra systemd-nspawn arguments...]: boots DIR in the background and waits until
# systemd inside reports running or degraded. On failure it prints why, stops what it started
# and returns 1.
ct_boot() {
    local dir=${1:?ct_boot DIR [nspawn args...]}
    shift
    _ct_require_root || return 1
    [[ -z $CT_NSPAWN_PID ]] || { _ct_err "this shell already runs container $CT_NAME (ct_stop it first)"; return 1; }
    [[ -x $dir/usr/lib/systemd/systemd || -x $dir/lib/systemd/systemd ]] ||
        { _ct_err "$dir has no systemd (not a rootfs from build-rootfs?)"; return 1; }
    _ct_ensure_tools 0 || return 1
    CT_ROOT=$(realpath "$dir")
    if [[ $CT_ROOT == "$(realpath -m "$CT_CACHE/rootfs")" ]]; then
        CT_ROOT=
        _ct_err "refusing to boot the pristine cache itself: boot a copy (ct_new_root, ct_copy_rootfs)"
        return 1
    fi
    CT_NAME="tunegate-ct-$$-$RANDOM"
    # The shell whose container this is: once it is gone (killed before its trap could run),
    # ct_gc (run by ct_up, selftest and the CLI's boot) stops the container. CT_DETACHED=1: none.
    CT_OWNER=''
    [[ ${CT_DETACHED:-0} == 1 ]] || CT_OWNER=$(_ct_proc_id $$) || CT_OWNER=''
    CT_LOG=$(mktemp "${TMPDIR:-/tmp}/$CT_NAME.XXXXXX.log") || return 1
    _ct_cgroup_prepare || { ct_stop; return 1; }
    local wrap=() timeout=${TUNEGATE_CT_BOOT_TIMEOUT:-60} start
    if _ct_host_has_systemd; then
        wrap=(systemd-run --scope --quiet --collect -p Delegate=yes --unit="$CT_NAME.scope")
    fi
    start=$(_ct_now)
    # setsid: a Ctrl-C on the terminal reaches our trap, not nspawn directly. TERM=dumb: plain
    # console output in the log.
    (
        for cg in "${CT_CGROUPS[@]}"; do
            echo "$BASHPID" >"$cg/cgroup.procs" || exit 97
        done
        export TERM=dumb
        exec setsid "${wrap[@]}" systemd-nspawn --quiet -D "$CT_ROOT" -b --register=no --keep-unit \
            --private-network --machine="$CT_NAME" --console=read-only --link-journal=no \
            --resolv-conf=off --timezone=off "$@"
    ) </dev/null >"$CT_LOG" 2>&1 &
    CT_NSPAWN_PID=$!
    _ct_save_state || true
    CT_STATE=''
    if ! ct_poll "$timeout" _ct_init_or_dead || [[ -z $CT_PID ]]; then
        if ! kill -0 "$CT_NSPAWN_PID" 2>/dev/null; then
            _ct_err "systemd-nspawn exited during boot; its output:"
        else
            _ct_err "no container init after ${timeout}s"
        fi
        tail -n 30 "$CT_LOG" >&2
        ct_stop
        return 1
    fi
    CT_PIDNS=$(readlink "/proc/$CT_PID/ns/pid")
    _ct_save_state || true
    ct_poll "$timeout" _ct_system_up_or_dead || true
    if ! _ct_running; then
        _ct_err "the container's systemd died during boot; console:"
        tail -n 30 "$CT_LOG" >&2
        ct_stop
        return 1
    fi
    case $CT_STATE in
    running) ;;
    degraded)
        _ct_log "warning: systemd inside is degraded; failed units:"
        ct_exec systemctl --failed --no-legend --plain >&2 || true
        ;;
    *)
        _ct_err "systemd inside is still '${CT_STATE:-unreachable}' after ${timeout}s; jobs and console:"
        ct_exec systemctl list-jobs --no-legend >&2 || true
        tail -n 30 "$CT_LOG" >&2
        ct_stop
        return 1
        ;;
    esac
    CT_BOOT_SECONDS=$(_ct_since "$start")
    _ct_log "container $CT_NAME up ($CT_STATE) in $CT_BOOT_SECONDS s, init pid $CT_PID, root $CT_ROOT"
}

# For ct_poll during a boot: the container's init is found (sets CT_PID), or nspawn is gone.
_ct_init_or_dead() {
    # Not _ct_nspawn_gone: until the subshell has exec'd nspawn its command line is not yet
    # nspawn's. Only its exit counts here.
    kill -0 "$CT_NSPAWN_PID" 2>/dev/null || return 0
    CT_PID=$(_ct_find_init) || CT_PID=
    [[ -n $CT_PID ]]
}

# For ct_poll during a boot: systemd inside has finished starting (sets CT_STATE), or the
# container is gone.
_ct_system_up_or_dead() {
    _ct_running || return 0
    CT_STATE=$(CT_EXEC_TIMEOUT=10 ct_exec systemctl is-system-running 2>/dev/null) || true
    [[ $CT_STATE == running || $CT_STATE == degraded ]]
}

# ct_up [nspawn args...]: build or reuse the cache, boot a fresh copy of it.
ct_up() {
    _ct_gc_quiet
    ct_build_rootfs || return 1
    ct_new_root || return 1
    ct_boot "$CT_ROOT" "$@"
}

ct_pid() {
    _ct_running || { _ct_err "no running container"; return 1; }
    echo "$CT_PID"
}

# ct_exec CMD...: runs CMD in all of the container's namespaces (not its cgroup) as root, with a
# clean environment, cwd /, stdin/stdout/stderr passed through, bounded by CT_EXEC_TIMEOUT
# (killed inside the container on expiry: exit status 124). Returns CMD's exit status.
ct_exec() {
    _ct_running || { _ct_err "no running container for: $*"; return 1; }
    local t=${CT_EXEC_TIMEOUT:-300}
    # -r -w: the root and cwd of the container's init (--wd=DIR would resolve DIR on the host).
    timeout -k 10 $((t + 30)) nsenter -t "$CT_PID" -a -r -w -- \
        env -i PATH="$CT_INNER_PATH" HOME=/root LANG=C.UTF-8 TERM=dumb SYSTEMD_PAGER=cat \
        SYSTEMD_COLORS=0 timeout -k 5 "$t" "$@"
}

# ct_sh SCRIPT [ARGS...]: sh -c SCRIPT inside the container.
ct_sh() {
    local script=${1:?ct_sh SCRIPT [args...]}
    shift
    ct_exec sh -c "$script" sh "$@"
}

# ct_copy_in SRC DEST: copies a host file or directory to DEST inside the container (DEST
# ending in / means "into that directory"), keeping the mode. It goes through the container's
# own mount namespace, so it also reaches /tmp and /run, which are tmpfs mounts there and not
# visible in the rootfs directory. Before boot (CT_ROOT set, nothing running) it copies into
# the rootfs directory.
ct_copy_in() {
    local src=${1:?ct_copy_in SRC DEST} dest=${2:?ct_copy_in SRC DEST}
    [[ -e $src ]] || { _ct_err "ct_copy_in: no such file: $src"; return 1; }
    [[ $dest == /* ]] || { _ct_err "ct_copy_in: DEST must be absolute: $dest"; return 1; }
    [[ $dest == */ ]] && dest="$dest$(basename "$src")"
    if ! _ct_running; then
        [[ -n $CT_ROOT ]] || { _ct_err "ct_copy_in: no container and no rootfs"; return 1; }
        mkdir -p "$CT_ROOT$(dirname "$dest")" && cp -a "$src" "$CT_ROOT$dest"
        return
    fi
    if [[ -d $src ]]; then
        tar -C "$src" -cf - . | ct_sh 'mkdir -p "$1" && tar -C "$1" -xpf -' "$dest"
    else
        local mode
        mode=$(stat -c %a "$src")
        ct_sh 'mkdir -p "$(dirname "$1")" && cat >"$1" && chmod "$2" "$1"' "$dest" "$mode" <"$src"
    fi
}

# ct_copy_out SRC DEST: a file from inside the container to the host.
ct_copy_out() {
    local src=${1:?ct_copy_out SRC DEST} dest=${2:?ct_copy_out SRC DEST}
    ct_exec cat "$src" >"$dest"
}

# ct_log_tail [N]: the last N lines of the container's console.
ct_log_tail() { [[ -n $CT_LOG && -r $CT_LOG ]] && tail -n "${1:-40}" "$CT_LOG"; }

# Kills what ct_exec (or any nsenter) started in the container and is still running: the
# processes of its pid namespace whose parent is outside it. Their nsenter parents reap them
# and exit. Before a poweroff this is needed: systemd-shutdown SIGSTOPs everything in the
# namespace before its SIGTERM, nsenter (waiting with WUNTRACED) then stops itself too and
# never reaps its child, so the shutdown hangs on that zombie. Killing nsenter instead would
# not do: its children are then reparented to the host's PID 1, not the container's, and wait
# there as zombies until the host reaps them.
_ct_kill_execs() {
    [[ -n $CT_PID && -n $CT_PIDNS ]] || return 0
    ct_poll 3 _ct_no_execs_left || true
}

# For ct_poll: kills the processes nsenter'd into the container; true once there are none.
_ct_no_execs_left() {
    local pid ppid found=0
    for pid in $(_ct_pids_in_ns "$CT_PIDNS"); do
        [[ $pid == "$CT_PID" ]] && continue
        ppid=$(awk '/^PPid:/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || continue
        [[ -n $ppid ]] || continue
        [[ $(readlink "/proc/$ppid/ns/pid" 2>/dev/null) == "$CT_PIDNS" ]] && continue
        found=1
        kill -KILL "$pid" 2>/dev/null || true
        # A stopped nsenter must run to reap it.
        if [[ $ppid != 1 ]]; then kill -CONT "$ppid" 2>/dev/null || true; fi
    done
    [[ $found == 0 ]]
}

# For ct_poll while powering off: true once nspawn is gone; every second, anything nsenter'd
# meanwhile (another shell's ct_exec) gets the same treatment as before the poweroff.
_ct_powered_off() {
    _ct_is_our_nspawn "$CT_NSPAWN_PID" || return 0
    _CT_POLLS=$((_CT_POLLS + 1))
    if ((_CT_POLLS % 10 == 0)); then _ct_kill_execs; fi
    return 1
}

# For ct_poll after the container is gone: kills what is left in its pid namespace (counting
# it in _CT_LEAKS); true once nothing is.
_ct_no_leftovers() {
    local pid found=0
    for pid in $(_ct_pids_in_ns "$CT_PIDNS"); do
        kill -KILL "$pid" 2>/dev/null || true
        found=1
        _CT_LEAKS=$((_CT_LEAKS + 1))
    done
    [[ $found == 0 ]]
}

# ct_stop: powers the container off (bounded), then kills whatever is left, removes its cgroups,
# nspawn's leftovers in /run, its fresh rootfs copy (never a DIR you booted yourself) and its
# log. Idempotent, never fails, safe in traps and under set -e. Sets CT_STOP_LEAKS to the number
# of container processes it had to kill after the nspawn process was gone (0 when clean).
ct_stop() {
    local tmo=${TUNEGATE_CT_STOP_TIMEOUT:-30} leaks=0
    CT_STOP_LEAKS=0
    if [[ -n $CT_NSPAWN_PID ]] && _ct_is_our_nspawn "$CT_NSPAWN_PID"; then
        if _ct_running; then
            # A ct_exec still running (in the background) would hang the poweroff.
            _ct_kill_execs
            CT_EXEC_TIMEOUT=10 ct_exec systemctl poweroff --no-block >/dev/null 2>&1 || true
        fi
        _CT_POLLS=0
        ct_poll "$tmo" _ct_powered_off || true
        if _ct_is_our_nspawn "$CT_NSPAWN_PID"; then
            _ct_log "warning: $CT_NAME did not power off in ${tmo}s; terminating systemd-nspawn"
            kill -TERM "$CT_NSPAWN_PID" 2>/dev/null || true
            ct_poll 10 _ct_nspawn_gone || true
        fi
        if _ct_is_our_nspawn "$CT_NSPAWN_PID"; then
            # The init first, so that nspawn (its parent) reaps it and exits by itself; an
            # init whose nspawn was killed first is left to the host's PID 1 to reap.
            _ct_log "warning: killing $CT_NAME"
            _ct_kill_execs
            if _ct_running; then kill -KILL "$CT_PID" 2>/dev/null || true; fi
            ct_poll 5 _ct_nspawn_gone || true
            kill -KILL "$CT_NSPAWN_PID" 2>/dev/null || true
            ct_poll 5 _ct_nspawn_gone || true
        fi
    fi
    if [[ -n $CT_NSPAWN_PID ]]; then
        wait "$CT_NSPAWN_PID" 2>/dev/null || true
    fi
    # Anything still in the container's pid namespace (an nsenter'd process whose parent died):
    # killing them is what makes "no process left" true.
    if [[ -n $CT_PIDNS ]]; then
        _CT_LEAKS=0
        ct_poll 1 _ct_no_leftovers || true
        leaks=$_CT_LEAKS
        [[ $leaks -gt 0 ]] && _ct_log "warning: killed $leaks leftover process(es) of $CT_NAME"
    fi
    # shellcheck disable=SC2034 # for the caller
    CT_STOP_LEAKS=$leaks
    _ct_cgroup_cleanup
    if [[ -n $CT_NAME ]]; then
        # nspawn cannot remove its propagation directory from a /run that is not a tmpfs.
        _ct_rm_tree "/run/systemd/nspawn/propagate/$CT_NAME"
        rm -f "$CT_RUNDIR/$CT_NAME.state"
    fi
    if [[ $CT_ROOT_OWNED == 1 && -n $CT_WORK ]]; then
        _ct_rm_tree "$CT_WORK"
    fi
    if [[ -n $CT_LOG && -e $CT_LOG ]]; then
        if [[ ${TUNEGATE_CT_KEEP_LOG:-0} == 1 ]]; then
            _ct_log "console log kept: $CT_LOG"
        else
            rm -f "$CT_LOG"
        fi
    fi
    CT_NAME='' CT_NSPAWN_PID='' CT_PID='' CT_PIDNS='' CT_ROOT='' CT_ROOT_OWNED='' CT_WORK='' CT_LOG='' CT_STATE=''
    CT_OWNER=''
    CT_CGROUPS=()
    return 0
}

# ct_trap: EXIT runs ct_stop first, then whatever EXIT trap was set before; INT, TERM and HUP
# exit (so EXIT runs) unless they already have a trap.
ct_trap() {
    local -a old=()
    eval "old=($(trap -p EXIT))"
    # shellcheck disable=SC2064
    trap "ct_stop; ${old[2]:-}" EXIT
    [[ -z $(trap -p INT) ]] && trap 'exit 130' INT
    [[ -z $(trap -p TERM) ]] && trap 'exit 143' TERM
    [[ -z $(trap -p HUP) ]] && trap 'exit 129' HUP
    return 0
}

# ct_gc: stops and cleans up containers left by a run that was killed before its trap could
# run (their owner shell is gone), and cleans up after containers whose nspawn died. Leaves
# alone containers whose owner still runs, and those from the `boot` command (no owner).
ct_gc() {
    local f
    for f in "$CT_RUNDIR"/*.state; do
        [[ -r $f ]] || continue
        (
            CT_OWNER=''
            ct_attach "$(basename "$f" .state)" || exit 0
            if ! _ct_is_our_nspawn "$CT_NSPAWN_PID"; then
                _ct_log "cleaning up after dead container $CT_NAME"
                ct_stop
            elif ! _ct_owner_alive; then
                _ct_log "stopping orphaned container $CT_NAME (its owner, pid ${CT_OWNER%%:*}, is gone)"
                ct_stop
            fi
        ) || true
    done
    return 0
}
_ct_gc_quiet() {
    if [[ -d $CT_RUNDIR ]]; then ct_gc; fi
    return 0
}

# Host pids of the processes in pid namespace $1 (a readlink of /proc/PID/ns/pid).
_ct_pids_in_ns() {
    local p
    for p in /proc/[0-9]*; do
        if [[ $(readlink "$p/ns/pid" 2>/dev/null) == "$1" ]]; then echo "${p#/proc/}"; fi
    done
    return 0
}

# ---------------------------------------------------------------------------------------------
# Command line

_ct_usage() {
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
}

_ct_main() {
    set -euo pipefail
    local cmd=${1:-}
    shift || true
    case $cmd in
    build-rootfs)
        local t
        t=$(_ct_now)
        ct_build_rootfs "$@"
        if [[ $CT_BUILT == 1 ]]; then
            echo "rootfs built in $(_ct_since "$t") s: $CT_CACHE/rootfs"
        else
            echo "rootfs cached: $CT_CACHE/rootfs"
        fi
        ;;
    boot)
        # The container outlives this command: no trap, no owner. A failed boot cleans up.
        _ct_gc_quiet
        CT_DETACHED=1
        if [[ $# -ge 1 ]]; then
            ct_boot "$@"
        else
            ct_build_rootfs
            ct_new_root
            ct_boot "$CT_ROOT" || { ct_stop; exit 1; }
        fi
        echo "$CT_NAME"
        ;;
    exec)
        ct_attach "${1:?exec NAME CMD...}"
        shift
        ct_exec "$@"
        ;;
    stop)
        ct_attach "${1:?stop NAME}"
        ct_stop
        ;;
    list)
        local f
        for f in "$CT_RUNDIR"/*.state; do
            [[ -r $f ]] && basename "$f" .state
        done
        return 0
        ;;
    gc) ct_gc ;;
    selftest) exec bash "$(dirname "${BASH_SOURCE[0]}")/container-selftest.sh" ;;
    -h | --help | help) _ct_usage ;;
    *)
        _ct_usage
        exit 2
        ;;
    esac
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    _ct_main "$@"
fi
