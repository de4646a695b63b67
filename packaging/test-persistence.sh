#!/usr/bin/env bash
# What holds across reboots and restarts: the host's sysctls after a real reboot, and the
# descriptor limit of the user's own systemd service after a restart. A real reboot: a minimal Debian 12 booted with
# systemd-nspawn in its own network namespace (packaging/container.sh), its root kept between
# boots, so a reboot is a poweroff and a boot of the same root, with systemd-sysctl applying
# /etc/sysctl.d at boot as on any Debian host. The tunegate binary is copied in (no package and no
# service: nothing of ours runs at boot, so only the persisted files can make the host pass).
#
#   1. fresh: `tunegate preflight --profile c100k` fails the per-namespace keys;
#   2. somaxconn is set by hand (`sysctl -w`, as the write-up's readers did), then
#      `tunegate apply --profile c100k --persist`;
#   3. reboot: every per-namespace sysctl.* finding passes and there is no persist.* warning
#      for them (somaxconn included: the drop-in holds the whole profile, not only what apply
#      raised);
#   4. an operator's /etc/sysctl.d/99-local.conf lowers somaxconn; reboot: the host fails it and
#      preflight names that file and line (persist.overridden.net.core.somaxconn);
#   5. `tunegate revert` removes the drop-in; reboot: no drop-in, and preflight says what the
#      boot no longer sets;
#   6. the user's own server, a small Python listener under its own unit (systemd's default
#      LimitNOFILE, soft 1024): `preflight --unit` fails its limit; `apply --unit` writes
#      /etc/systemd/system/NAME.service.d/60-tunegate.conf and reloads systemd; after
#      `systemctl restart`, `preflight --unit` passes; `revert` removes the drop-in and systemd
#      is back to 1024.
# Exit 0 only if all of it holds. Root. Bounded: every wait has a timeout; the container is
# powered off and its root removed on any exit.
#
# Environment: TUNEGATE_BIN (default target/release/tunegate; build it first).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=packaging/container.sh
source packaging/container.sh

log() { printf 'test-persistence: %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
ok() { log "ok: $*"; }

bin=${TUNEGATE_BIN:-target/release/tunegate}
[[ -x $bin ]] || fail "no tunegate binary at $bin (cargo build --release, or set TUNEGATE_BIN)"
work=$(mktemp -d "${TUNEGATE_CT_WORKDIR:-/var/tmp}/tunegate-persistence.XXXXXX")
trap 'rm -rf "$work"' EXIT
ct_trap # powers the container off first, then removes $work
root=$work/root
ct_build_rootfs
ct_copy_rootfs "$root"
install -m 0755 "$bin" "$root/usr/local/bin/tunegate"

# shellcheck disable=SC2120 # no nspawn arguments
boot() { ct_boot "$root" || fail "the container did not boot"; }
reboot() {
    ct_stop
    boot
    log "rebooted"
}
# report NAME [ARGS...]: preflight (c100k unless ARGS say otherwise) as JSON into
# $work/NAME.json (exit 1 means "fails": expected).
report() {
    local rc=0 name=$1
    shift
    (($# > 0)) || set -- --profile c100k
    ct_exec tunegate preflight "$@" --format json >"$work/$name.json" 2>"$work/$name.err" || rc=$?
    ((rc <= 1)) || { cat "$work/$name.err" >&2; fail "preflight exited $rc"; }
}
# check NAME PYTHON: runs PYTHON with `r` = the report and `f(id)` = a finding (or None);
# fails the test with its message on AssertionError.
check() {
    python3 - "$work/$1.json" "$2" <<'EOF' || fail "$1: see above"
import json, sys
r = json.load(open(sys.argv[1]))
byid = {x["id"]: x for x in r["findings"]}
f = byid.get
ns = [x for x in r["findings"] if x["scope"] == "net-namespace"]
ids = [x["id"] for x in ns]
try:
    exec(sys.argv[2])
except AssertionError as e:
    print(f"check failed: {e}", file=sys.stderr)
    sys.exit(1)
EOF
}

boot
report fresh
check fresh '
assert f("sysctl.net.core.somaxconn")["verdict"] == "fail", f("sysctl.net.core.somaxconn")
assert not r["context"]["initial_netns"], "not in a namespace of its own"'
ok "fresh container: c100k fails (somaxconn $(ct_exec sysctl -n net.core.somaxconn))"

ct_exec sysctl -q -w net.core.somaxconn=65535
ct_exec tunegate apply --profile c100k --persist >"$work/apply.txt" 2>&1 || true # host-global keys stay
grep -q "persisted: /etc/sysctl.d/60-tunegate.conf" "$work/apply.txt" || { cat "$work/apply.txt" >&2; fail "apply --persist"; }
ct_exec grep -qx "net.core.somaxconn = 65535" /etc/sysctl.d/60-tunegate.conf ||
    fail "somaxconn, set by hand before apply, is not in the drop-in: $(ct_exec cat /etc/sysctl.d/60-tunegate.conf)"
report applied
check applied '
bad = [x["id"] for x in ns if x["id"].startswith("persist.") and x["verdict"] != "pass"]
assert not bad, f"persist findings after apply --persist: {bad}"'
ok "somaxconn set by hand, then apply --persist: the drop-in holds it; no persist.* warning before the reboot"

reboot
report rebooted
check rebooted '
failing = [(x["id"], x["current"]) for x in ns if x["id"].startswith("sysctl.") and x["verdict"] != "pass"]
assert not failing, f"per-namespace keys failing after the reboot: {failing}"
persist = [(x["id"], x["verdict"]) for x in ns if x["id"].startswith("persist.")]
assert persist and all(v == "pass" for _, v in persist), f"persist findings: {persist}"
assert "60-tunegate.conf" in f("persist.net.core.somaxconn")["current"], f("persist.net.core.somaxconn")'
[[ $(ct_exec systemctl show -p ActiveState --value systemd-sysctl) == active ]] ||
    log "note: systemd-sysctl.service is $(ct_exec systemctl show -p ActiveState --value systemd-sysctl) (it also tries host-global keys of other files, read-only here)"
ok "after a reboot every per-namespace key of c100k passes from the drop-in alone (somaxconn $(ct_exec sysctl -n net.core.somaxconn))"

ct_sh 'printf "# the operator file\nnet.core.somaxconn = 1024\n" >/etc/sysctl.d/99-local.conf'
reboot
report overridden
check overridden '
s = f("persist.overridden.net.core.somaxconn")
assert s and s["verdict"] == "warn", f"no persist.overridden for somaxconn: {ids}"
assert "/etc/sysctl.d/99-local.conf:2" in s["current"], s
assert "line 2 of /etc/sysctl.d/99-local.conf" in s["fix"], s
assert "60-tunegate.conf" in s["detail"], s
assert f("sysctl.net.core.somaxconn")["current"] == "1024"'
ok "99-local.conf lowering somaxconn: after a reboot preflight names /etc/sysctl.d/99-local.conf:2"

ct_exec rm /etc/sysctl.d/99-local.conf
ct_exec tunegate revert >"$work/revert.txt" 2>&1 || { cat "$work/revert.txt" >&2; fail "revert"; }
ct_exec test ! -e /etc/sysctl.d/60-tunegate.conf || fail "revert left the drop-in"
reboot
report reverted
check reverted '
assert f("sysctl.net.core.somaxconn")["verdict"] == "fail", "somaxconn passes after revert and reboot?"
left = [x["id"] for x in r["findings"] if "60-tunegate.conf" in (x["current"] or "")]
assert not left, f"findings still see the drop-in: {left}"'
ok "revert removed the drop-in; after a reboot the host is back to the kernel's values"

# 6. The user's own server under its own unit. listen(4096) is the default profile's somaxconn,
# so only the descriptor limit is wrong.
cat >"$work/echo-server.service" <<'UNIT'
[Unit]
Description=the user's own server (a Python listener)
[Service]
ExecStart=/usr/bin/python3 -c "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 9000)); s.listen(4096); time.sleep(86400)"
UNIT
chmod 0644 "$work/echo-server.service"
ct_copy_in "$work/echo-server.service" /etc/systemd/system/echo-server.service
ct_exec tunegate apply --profile default >/dev/null 2>&1 || true # somaxconn 4096 before it listens
ct_exec systemctl daemon-reload
ct_exec systemctl start echo-server
listening() { ct_exec sh -c 'ss -Hltn "sport = :9000" | grep -q .'; }
ct_poll 10 listening || fail "echo-server does not listen on 9000"
soft_of_unit() { ct_exec systemctl show -p LimitNOFILESoft --value echo-server; }
report unit_before --profile default --unit echo-server
check unit_before '
n = f("server.nofile")
assert n["verdict"] == "fail" and n["current"].startswith("soft 1024,"), n
assert "tunegate apply --unit echo-server.service" in n["fix"], n
assert f("server.backlog.9000")["verdict"] == "pass", f("server.backlog.9000")'
ok "preflight --unit echo-server: RLIMIT_NOFILE soft 1024 fails the default profile's 16384"

ct_exec tunegate apply --profile default --unit echo-server >"$work/unit-apply.txt" 2>&1 || true
grep -q "LimitNOFILE 1024 -> 16384 in /etc/systemd/system/echo-server.service.d/60-tunegate.conf" "$work/unit-apply.txt" ||
    { cat "$work/unit-apply.txt" >&2; fail "apply --unit"; }
grep -q "daemon-reload done" "$work/unit-apply.txt" || { cat "$work/unit-apply.txt" >&2; fail "no daemon-reload"; }
[[ $(soft_of_unit) == 16384 ]] || fail "systemd says LimitNOFILESoft=$(soft_of_unit) after apply --unit"
report unit_applied --profile default --unit echo-server
check unit_applied '
n = f("server.nofile")
assert n["verdict"] == "fail" and "takes effect when it restarts" in n["detail"], n'
ct_exec systemctl restart echo-server
ct_poll 10 listening || fail "echo-server does not listen after the restart"
report unit_restarted --profile default --unit echo-server
check unit_restarted '
bad = [(x["id"], x["current"]) for x in r["findings"] if x["id"].startswith("server.") and x["verdict"] != "pass"]
assert not bad, bad
assert f("server.nofile")["current"].startswith("soft 16384,"), f("server.nofile")'
ok "apply --unit wrote LimitNOFILE=16384 and reloaded systemd; after a restart preflight --unit passes"

ct_exec tunegate revert >"$work/unit-revert.txt" 2>&1 || { cat "$work/unit-revert.txt" >&2; fail "revert"; }
grep -q "removed   /etc/systemd/system/echo-server.service.d/60-tunegate.conf" "$work/unit-revert.txt" ||
    { cat "$work/unit-revert.txt" >&2; fail "revert did not remove the unit drop-in"; }
ct_exec test ! -e /etc/systemd/system/echo-server.service.d || fail "revert left the drop-in directory"
[[ $(soft_of_unit) == 1024 ]] || fail "LimitNOFILESoft=$(soft_of_unit) after revert"
ct_exec test -s /etc/systemd/system/echo-server.service || fail "revert touched the user's own unit"
ok "revert removed the unit drop-in and reloaded systemd; the user's own unit file untouched"
log "all checks passed"
