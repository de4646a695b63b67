#!/usr/bin/env bash
# The Debian package under a real systemd: builds the .deb (packaging/build-deb.sh: lintian must
# be clean), boots a minimal Debian 12 with systemd-nspawn in its own network namespace
# (packaging/container.sh; the root is debootstrapped once and cached), and proves:
#   - dpkg -i prints the postinst preflight report and brings tunegate.service to
#     active (running) through Type=notify;
#   - the bundled server answers /healthz and a WebSocket handshake (with its hello) inside;
#   - systemctl reload and systemctl restart work, and a reload to the c100k profile sizes and
#     brings up its workers (6 here: 20,000 descriptors per process) in the same daemon;
#   - an upgrade (dpkg -i again) keeps an edited conffile and the apply journal;
#   - dpkg --purge leaves no process, no unit, no state, and the namespace's net sysctls back at
#     their values from before the install;
#   - a purge whose revert fails keeps the journal, and nothing else.
# Exit 0 only if all of it holds. Bounded: every wait has a timeout; the container is powered
# off and removed on any exit.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=packaging/container.sh
source packaging/container.sh

log() { printf 'test-deb: %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
ok() { log "ok: $*"; }

deb=$(bash packaging/build-deb.sh)
ok "lintian clean: $deb"

work=$(mktemp -d "${TMPDIR:-/tmp}/tunegate-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
ct_trap # the container is powered off and removed on any exit, before $work goes
# shellcheck disable=SC2119 # ct_up takes optional nspawn arguments; none here
ct_up
ct_copy_in "$deb" /root/tunegate.deb

# The namespace's net keys tunegate may raise, before anything is installed.
keys=(net.core.somaxconn net.ipv4.tcp_max_syn_backlog net.ipv4.tcp_migrate_req
    net.ipv4.ip_local_port_range net.ipv4.ip_local_reserved_ports net.ipv4.tcp_rmem net.ipv4.tcp_wmem)
before=$(ct_exec sysctl "${keys[@]}")

unit_active() { [[ $(ct_exec systemctl show -p ActiveState --value tunegate) == active ]]; }
wait_active() {  # wait_active: until tunegate.service is active (running), at most 60 s
    ct_poll 60 unit_active && return 0
    ct_exec systemctl status tunegate --no-pager >&2 || true
    ct_exec journalctl -u tunegate --no-pager -n 40 >&2 || true
    fail "tunegate.service is not active after 60 s"
}

# 1. install
install_out=$(ct_exec dpkg -i /root/tunegate.deb 2>&1) || { echo "$install_out" >&2; fail "dpkg -i"; }
echo "$install_out" | grep -q "tunegate: preflight of this host" || fail "no preflight report from postinst"
echo "$install_out" | grep -Eq '^(PASS|FAIL|WARN) ' || fail "the preflight report has no checks"
ok "postinst printed the preflight report ($(echo "$install_out" | grep -cE '^(PASS|FAIL|WARN) ') checks)"
wait_active
[[ $(ct_exec systemctl show -p Type --value tunegate) == notify ]] || fail "the unit is not Type=notify"
[[ $(ct_exec systemctl show -p SubState --value tunegate) == running ]] || fail "not running"
status=$(ct_exec systemctl show -p StatusText --value tunegate)
[[ $status == running:* ]] || fail "the daemon's STATUS= is '$status'"
ok "tunegate.service active (running), Type=notify, STATUS=\"$status\""
# The unit's UMask=0077 must not hide the status from an operator who is not root.
ct_exec setpriv --reuid=nobody --regid=nogroup --clear-groups tunegate status >"$work/status.txt" 2>&1 ||
    { cat "$work/status.txt" >&2; fail "tunegate status as user nobody"; }
grep -q "saturation, worst first" "$work/status.txt" || { cat "$work/status.txt" >&2; fail "no saturation in the status"; }
if grep -q "daemon not running" "$work/status.txt"; then cat "$work/status.txt" >&2; fail "the daemon looks dead to user nobody"; fi
ok "tunegate status works for a user who is not root, with the saturation watch's levels"
[[ $(ct_exec systemctl is-enabled tunegate) == enabled ]] || fail "not enabled"
ct_exec test -f /usr/lib/systemd/system/tunegate.service || fail "unit not in /usr/lib/systemd/system"
for path in /usr/bin/tunegate /usr/share/man/man1/tunegate.1.gz /usr/share/man/man1/tunegate-run.1.gz \
    /usr/share/bash-completion/completions/tunegate /usr/share/zsh/vendor-completions/_tunegate \
    /usr/share/fish/vendor_completions.d/tunegate.fish /usr/share/tunegate/profiles/c100k.yaml \
    /usr/share/doc/tunegate/copyright /usr/share/doc/tunegate/changelog.Debian.gz \
    /usr/share/doc/tunegate/examples/nginx.conf /usr/share/tunegate/monitoring/tunegate-alerts.yml \
    /usr/share/tunegate/monitoring/tunegate-dashboard.json; do
    ct_exec test -s "$path" || fail "$path is not installed"
done
# shellcheck disable=SC2016 # a dpkg-query field, not a shell expansion
ct_exec dpkg-query -W -f '${Conffiles}' tunegate | grep -q /etc/tunegate/tunegate.yaml \
    || fail "/etc/tunegate/tunegate.yaml is not a conffile"
# The daemon and the server it starts: two processes at least, none of them root.
users=$(ct_exec ps -o user= -C tunegate | sort | uniq -c | awk '{print $2 "x" $1}' | paste -sd' ')
[[ $users =~ ^tunegatex([2-9]|[1-9][0-9]+)$ ]] || fail "tunegate processes by user: '$users' (want only the tunegate user, 2 or more)"
ok "installed files, conffile, and the daemon and its server run as the tunegate system user ($users)"

# 2. the bundled server, from inside the container
[[ $(ct_exec curl -s -m 5 http://127.0.0.1:8080/healthz) == ok ]] || fail "/healthz"
hello=$(ct_exec python3 -c '
import base64, os, socket
s = socket.create_connection(("127.0.0.1", 8080), timeout=5)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(("GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % key).encode())
buf = b""
while b"\r\n\r\n" not in buf:
    buf += s.recv(4096)
head, rest = buf.split(b"\r\n\r\n", 1)
assert head.startswith(b"HTTP/1.1 101"), head
while len(rest) < 2 or len(rest) < 2 + (rest[1] & 0x7f):
    rest += s.recv(4096)
print(rest[2:2 + (rest[1] & 0x7f)].decode())
')
[[ $hello == *'"op":"hello"'* ]] || fail "no hello after the upgrade: $hello"
ok "WebSocket upgrade answered inside the container: $hello"

# 3. reload and restart
pid=$(ct_exec systemctl show -p MainPID --value tunegate)
ct_exec systemctl reload tunegate
wait_active
[[ $(ct_exec systemctl show -p MainPID --value tunegate) == "$pid" ]] || fail "reload restarted the daemon"
ct_exec journalctl -u tunegate --no-pager | grep -q "reloaded configuration" || fail "no reload in the journal"
ok "systemctl reload: same daemon ($pid), configuration reloaded"
ct_exec systemctl restart tunegate
wait_active
pid2=$(ct_exec systemctl show -p MainPID --value tunegate)
[[ $pid2 != "$pid" ]] || fail "restart kept the same pid"
[[ $(ct_exec curl -s -m 5 http://127.0.0.1:8080/healthz) == ok ]] || fail "/healthz after restart"
ok "systemctl restart: new daemon ($pid2), serving"

# 4. the operator switches to the c100k profile and reloads. Where systemd cannot grant
# LimitNOFILE (no CAP_SYS_RESOURCE, as here: 20,000 descriptors per process), 100,000
# connections need several workers and the bus, started by the same daemon under the unit's
# sandbox; with the limit granted, one process holds them.
healthz_says() {  # sets `got` (wait_healthz's) to what /healthz answers
    got=$(ct_exec curl -s -m 2 http://127.0.0.1:8080/healthz) || true
    [[ $got == "$1" ]]
}
wait_healthz() {  # wait_healthz TEXT: until /healthz answers TEXT, at most 30 s
    local got=''
    ct_poll 30 healthz_says "$1" && return 0
    ct_exec journalctl -u tunegate --no-pager -n 30 >&2 || true
    fail "/healthz says '$got', not '$1'"
}
ct_exec sed -i 's/^profile: default$/profile: c100k  # edited by the operator/' /etc/tunegate/tunegate.yaml
ct_exec systemctl reload tunegate
c100k_sized() {  # sets `sizing` to the daemon's sizing line for the c100k profile, if any
    sizing=$(ct_exec journalctl -u tunegate --no-pager -o cat | grep '^sizing: .*target_connections 100000' | tail -n 1) || true
    [[ -n $sizing ]]
}
sizing=''
ct_poll 30 c100k_sized || true
[[ $sizing =~ ^sizing:\ ([0-9]+)\ worker.*capacity\ ([0-9]+)\ connections ]] || fail "no sizing for c100k after the reload: '$sizing'"
workers=${BASH_REMATCH[1]}
((BASH_REMATCH[2] >= 100000)) || fail "sized below the profile's 100,000 connections: $sizing"
wait_healthz "ok: $workers of $workers workers up"
[[ $(ct_exec systemctl show -p MainPID --value tunegate) == "$pid2" ]] || fail "the reload to c100k restarted the daemon"
ok "reload to c100k: same daemon, $workers of $workers workers up ($sizing)"

# 5. upgrade: the operator's conffile edit and the journal survive, and the restarted daemon
# runs with the edit
ct_exec test -s /var/lib/tunegate/journal.json || fail "no apply journal after start"
ct_exec dpkg -i /root/tunegate.deb >/dev/null 2>&1 || fail "upgrade (dpkg -i again)"
wait_active
ct_exec grep -q "^profile: c100k  # edited by the operator" /etc/tunegate/tunegate.yaml || fail "upgrade lost the conffile edit"
ct_exec test -s /var/lib/tunegate/journal.json || fail "upgrade lost the journal"
wait_healthz "ok: $workers of $workers workers up"
ok "upgrade kept the edited conffile and the journal; the daemon runs c100k with $workers worker(s)"

# 6. an operator persists a bigger profile: the drop-in goes to sysctl.d, which purge removes
ct_exec tunegate apply --profile c100k --persist >"$work/apply.txt" 2>&1 || true # rmem_max: host-global
grep -q "persisted: /etc/sysctl.d/60-tunegate.conf" "$work/apply.txt" || { cat "$work/apply.txt" >&2; fail "apply --persist"; }
ct_exec grep -q "net.core.somaxconn = 65535" /etc/sysctl.d/60-tunegate.conf || fail "no somaxconn in the drop-in"
ok "apply --persist wrote /etc/sysctl.d/60-tunegate.conf"
# The operator's apply ran as root; the journal and the lock it wrote must still be the
# service's: readable and lockable by user tunegate, and the daemon must start on them.
for f in journal.json lock; do
    owner=$(ct_exec stat -c %U:%G "/var/lib/tunegate/$f")
    [[ $owner == tunegate:tunegate ]] || fail "root's apply left /var/lib/tunegate/$f to $owner"
done
as_tunegate() { ct_exec setpriv --reuid=tunegate --regid=tunegate --init-groups "$@"; }
as_tunegate cat /var/lib/tunegate/journal.json >/dev/null || fail "user tunegate cannot read the journal"
as_tunegate flock --nonblock /var/lib/tunegate/lock true || fail "user tunegate cannot take the lock"
ct_exec systemctl restart tunegate
wait_active
if ct_exec journalctl -u tunegate --no-pager -o cat --since=-30s | grep -Ei 'permission denied|cannot (open|read)'; then
    fail "the daemon could not use the state root's apply left"
fi
ok "after root's apply, journal and lock belong to user tunegate; the daemon restarted on them"

# 7. purge
# tunegate processes, by name and by executable path (the pattern is anchored: ct_exec's own
# `timeout` wrapper carries it in its command line). Must find the daemon now, so that finding
# nothing after the purge means something.
tunegate_processes() { ct_exec sh -c '{ pgrep -a -x tunegate; pgrep -a -f "^[^ ]*/tunegate( |\$)"; } | grep .'; }
tunegate_processes >/dev/null || fail "the process check does not see the running daemon"
ct_exec dpkg --purge tunegate >"$work/purge.txt" 2>&1 || { cat "$work/purge.txt" >&2; fail "dpkg --purge"; }
grep -q "restored" "$work/purge.txt" || { cat "$work/purge.txt" >&2; fail "purge did not revert"; }
if survivors=$(tunegate_processes); then
    fail "tunegate processes survived the purge: $survivors"
fi
[[ $(ct_exec systemctl show -p LoadState --value tunegate) == not-found ]] || fail "the unit is still known"
for path in /var/lib/tunegate /run/tunegate /etc/tunegate /etc/sysctl.d/60-tunegate.conf \
    /usr/lib/systemd/system/tunegate.service /etc/systemd/system/multi-user.target.wants/tunegate.service; do
    if ct_exec test -e "$path"; then fail "$path survived the purge"; fi
done
after=$(ct_exec sysctl "${keys[@]}")
[[ $after == "$before" ]] || fail "net sysctls not back: before
$before
after
$after"
ok "purge: no process, no unit, no state; $(grep -c restored "$work/purge.txt") value(s) restored, every net key as before the install"

# 8. a purge whose revert fails keeps the journal (the only record of the values from before)
ct_exec dpkg -i /root/tunegate.deb >/dev/null 2>&1 || fail "install again after the purge"
wait_active
ct_exec test -s /var/lib/tunegate/journal.json || fail "no apply journal after the second install"
# A journal from another network namespace: revert refuses it (exit 2) without --force.
ct_exec python3 -c '
import json
p = "/var/lib/tunegate/journal.json"
j = json.load(open(p))
j["netns"] = "net:[1]"
json.dump(j, open(p, "w"))
'
journal=$(ct_exec cat /var/lib/tunegate/journal.json)
ct_exec dpkg --purge tunegate >"$work/purge2.txt" 2>&1 || { cat "$work/purge2.txt" >&2; fail "a failed revert failed the purge"; }
grep -q "journal.json is kept" "$work/purge2.txt" || { cat "$work/purge2.txt" >&2; fail "the purge did not say the journal is kept"; }
[[ $(ct_exec cat /var/lib/tunegate/journal.json) == "$journal" ]] || fail "the kept journal is not the one from before the purge"
[[ $(ct_exec ls -A /var/lib/tunegate) == journal.json ]] || fail "more than the journal was kept: $(ct_exec ls -A /var/lib/tunegate)"
if survivors=$(tunegate_processes); then fail "tunegate processes survived the second purge: $survivors"; fi
[[ $(ct_exec systemctl show -p LoadState --value tunegate) == not-found ]] || fail "the unit is still known"
ok "a purge whose revert fails keeps /var/lib/tunegate/journal.json, and only that"
log "all checks passed"
