#!/usr/bin/env bash
# packaging/container-selftest.sh: proves packaging/container.sh itself, before any test uses
# it: the cached rootfs builds or is reused, a fresh copy boots a real systemd as PID 1, units
# run, notify and time out as systemd says, loopback and sysctls are the container's own, a
# second boot sees nothing of the first, and a stop leaves no process, cgroup, copy or file
# behind, even with a ct_exec still running. Root; run it as
#   bash packaging/container-selftest.sh      (or: packaging/container.sh selftest)
# Every wait is bounded (ct_poll, and ct_exec's own timeout).
# Scripts for inside the container and check expressions are single-quoted on purpose.
# shellcheck disable=SC2016
set -euo pipefail
# shellcheck source=packaging/container.sh
source "$(dirname "${BASH_SOURCE[0]}")/container.sh"

ct_selftest() {
    set -euo pipefail
    local passed=0 failed=0 t build_s copy_s host_before host_after inner new out
    check() { # check DESCRIPTION COMMAND...
        local what=$1
        shift
        if "$@"; then
            printf 'ok    %s\n' "$what"
            passed=$((passed + 1))
        else
            printf 'FAIL  %s\n' "$what"
            failed=$((failed + 1))
        fi
    }
    ct_trap
    _ct_gc_quiet

    echo "== rootfs ($CT_CACHE)"
    t=$(_ct_now)
    ct_build_rootfs
    build_s=$(_ct_since "$t")
    if [[ $CT_BUILT == 1 ]]; then
        echo "timing: cold build of the rootfs: ${build_s} s"
    else
        echo "timing: cached rootfs reused (${build_s} s)"
    fi

    echo "== boot 1: a fresh copy"
    t=$(_ct_now)
    ct_new_root
    copy_s=$(_ct_since "$t")
    echo "timing: fresh copy: ${copy_s} s"
    ct_boot "$CT_ROOT"
    echo "timing: boot to running: ${CT_BOOT_SECONDS} s"

    out=$(ct_exec systemctl is-system-running || true)
    check "systemctl is-system-running is running or degraded ($out)" \
        eval '[[ $out == running || $out == degraded ]]'
    check "PID 1 inside is systemd" eval '[[ $(ct_exec cat /proc/1/comm) == systemd ]]'
    check "ct_pid is the container's init" eval '[[ $(ct_pid) == "$CT_PID" ]]'
    check "only loopback in the private network" \
        eval '[[ $(ct_exec ip -o link show | awk -F": " "{print \$2}" | paste -sd,) == lo ]]'

    ct_exec systemd-run --quiet --unit=probe sleep 30
    check "transient service probe is active" eval '[[ $(ct_exec systemctl is-active probe) == active ]]'

    # Type=notify, READY=1 sent by the main process itself (as tunegate does, NotifyAccess=main).
    # systemd-run returns when the start job is done, which for Type=notify is READY=1: the
    # 1.5 s the probe waits before it says so must show in how long systemd-run took.
    ct_sh 'cat >/usr/local/bin/notify-probe && chmod 755 /usr/local/bin/notify-probe' <<'EOF'
#!/usr/bin/python3
import os, socket, sys, time
time.sleep(float(sys.argv[1]))
if sys.argv[2] == "notify":
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.connect(addr)
    s.sendall(b"READY=1\nSTATUS=probe ready")
time.sleep(60)
EOF
    t=$(_ct_now)
    ct_exec systemd-run --quiet --unit=notify-main -p Type=notify -p NotifyAccess=main \
        -p TimeoutStartSec=20 /usr/local/bin/notify-probe 1.5 notify
    local notify_s
    notify_s=$(_ct_since "$t")
    check "Type=notify (main process sends READY=1) reaches active" \
        eval '[[ $(ct_exec systemctl is-active notify-main) == active ]]'
    check "systemd waited for READY=1 (${notify_s} s >= 1.5 s)" \
        awk -v s="$notify_s" 'BEGIN { exit !(s >= 1.4) }'
    check "the service's STATUS= reached systemd" \
        eval '[[ $(ct_exec systemctl show -P StatusText notify-main) == "probe ready" ]]'
    # The shell form with systemd-notify(1) and NotifyAccess=all.
    ct_exec systemd-run --quiet --unit=notify-shell -p Type=notify -p NotifyAccess=all \
        -p TimeoutStartSec=20 sh -c 'sleep 0.5; systemd-notify --ready; exec sleep 60' || true
    check "Type=notify with systemd-notify --ready (NotifyAccess=all) reaches active" \
        eval '[[ $(ct_exec systemctl is-active notify-shell) == active ]]'
    # The negative: a Type=notify service that never says READY=1 must fail its start.
    if ct_exec systemd-run --quiet --unit=notify-never -p Type=notify -p TimeoutStartSec=3 \
        /usr/local/bin/notify-probe 0 silent 2>/dev/null; then
        check "Type=notify without READY=1 fails to start" false
    else
        check "Type=notify without READY=1 fails to start (Result=$(ct_exec systemctl show -P Result notify-never))" \
            eval '[[ $(ct_exec systemctl show -P Result notify-never) == timeout ]]'
    fi

    # Loopback inside the private network: a server and a client, both in the container.
    ct_exec systemd-run --quiet --unit=http-probe -p Type=simple \
        python3 -m http.server --bind 127.0.0.1 18080 --directory /etc
    out=
    fetch() { out=$(ct_exec curl -s --max-time 2 http://127.0.0.1:18080/hostname 2>/dev/null); }
    ct_poll 5 fetch || true
    check "curl reaches a python3 server on the container's loopback" eval '[[ $out == tunegate-ct ]]'
    check "the container's 127.0.0.1:18080 is not the host's" \
        eval '! curl -s --max-time 1 http://127.0.0.1:18080/hostname 2>/dev/null | grep -qx tunegate-ct'

    # Network namespace isolation: a net sysctl changed inside leaves the host's alone.
    host_before=$(cat /proc/sys/net/core/somaxconn)
    inner=$(ct_exec sysctl -n net.core.somaxconn)
    new=$((inner == 1234 ? 1235 : 1234))
    [[ $new == "$host_before" ]] && new=$((new + 1))
    ct_exec sysctl -q -w net.core.somaxconn="$new"
    host_after=$(cat /proc/sys/net/core/somaxconn)
    check "sysctl -w net.core.somaxconn=$new inside took effect" \
        eval '[[ $(ct_exec sysctl -n net.core.somaxconn) == "$new" ]]'
    check "the host's net.core.somaxconn is unchanged ($host_before -> $host_after)" \
        eval '[[ $host_after == "$host_before" ]]'

    # What the container gets from this host; tunegate's unit asks for both.
    local bnd nofile
    bnd=$(awk '/^CapBnd:/ { print $2 }' "/proc/$CT_PID/status")
    nofile=$(awk '/^Max open files/ { print $5 }' "/proc/$CT_PID/limits")
    if (((16#$bnd >> 24) & 1)); then
        echo "note: container bounding set 0x$bnd: CAP_SYS_RESOURCE present"
    else
        echo "note: container bounding set 0x$bnd: CAP_SYS_RESOURCE ABSENT (this host's bounding set lacks it; services asking for it run without it)"
    fi
    echo "note: container init's RLIMIT_NOFILE hard limit: $nofile (fs.nr_open $(cat /proc/sys/fs/nr_open))"

    ct_copy_in /etc/os-release /tmp/copied/os-release
    check "ct_copy_in reaches the container's /tmp (a tmpfs)" \
        eval '[[ $(ct_exec cat /tmp/copied/os-release) == "$(cat /etc/os-release)" ]]'
    # State that a second run must not see.
    ct_exec touch /root/left-by-run-1

    echo "== stop 1"
    local nspawn_pid=$CT_NSPAWN_PID init_pid=$CT_PID pidns=$CT_PIDNS name=$CT_NAME work=$CT_WORK
    local -a cgroups=("${CT_CGROUPS[@]}")
    t=$(_ct_now)
    ct_stop
    echo "timing: stop: $(_ct_since "$t") s"
    _ct_check_gone "$nspawn_pid" "$init_pid" "$pidns" "$name" "$work" "${cgroups[@]}"

    echo "== boot 2: another fresh copy (warm)"
    t=$(_ct_now)
    ct_new_root
    ct_boot "$CT_ROOT"
    echo "timing: warm start (copy + boot): $(_ct_since "$t") s"
    check "run 2 does not see run 1's files" eval '! ct_exec test -e /root/left-by-run-1'
    check "run 2 starts with the default net.core.somaxconn ($inner)" \
        eval '[[ $(ct_exec sysctl -n net.core.somaxconn) == "$inner" ]]'
    check "no unit from run 1" eval '[[ $(ct_exec systemctl is-active probe || true) != active ]]'
    nspawn_pid=$CT_NSPAWN_PID init_pid=$CT_PID pidns=$CT_PIDNS name=$CT_NAME work=$CT_WORK
    cgroups=("${CT_CGROUPS[@]}")
    # A process nsenter'd into the container, left running: ct_stop must not leave it behind.
    (CT_EXEC_TIMEOUT=120 ct_exec sleep 100 >/dev/null 2>&1 &)
    sleeping() { ct_exec pgrep -x sleep >/dev/null; }
    ct_poll 5 sleeping || true
    echo "== stop 2 (with a ct_exec still running)"
    t=$(_ct_now)
    ct_stop
    echo "timing: stop: $(_ct_since "$t") s"
    _ct_check_gone "$nspawn_pid" "$init_pid" "$pidns" "$name" "$work" "${cgroups[@]}"

    echo "selftest: $passed passed, $failed failed"
    [[ $failed == 0 ]]
}


_ct_check_gone() {
    local nspawn_pid=$1 init_pid=$2 pidns=$3 name=$4 work=$5
    shift 5
    local left cgroups=("$@")
    check "systemd-nspawn ($nspawn_pid) is gone" eval '! kill -0 "$nspawn_pid" 2>/dev/null'
    check "the container's init ($init_pid) is gone" \
        eval '[[ $(readlink "/proc/$init_pid/ns/pid" 2>/dev/null) != "$pidns" ]]'
    left=$(_ct_pids_in_ns "$pidns" | paste -sd' ')
    check "no process left in the container's pid namespace${left:+ (left: $left)}" eval '[[ -z $left ]]'
    check "no systemd-nspawn process for $name on the host" eval '! pgrep -f -- "--machine=$name" >/dev/null'
    check "no cgroup left (${cgroups[*]:-none made})" eval '! ls -d "${cgroups[@]}" >/dev/null 2>&1'
    check "fresh copy removed" eval '[[ ! -e $work ]]'
    check "no nspawn leftovers in /run" eval '[[ ! -e /run/systemd/nspawn/propagate/$name && ! -e $CT_RUNDIR/$name.state ]]'
}


ct_selftest
