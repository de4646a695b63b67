#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Needs root: the integration tests create network namespaces and change their sysctls.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x "$HOME/.cargo/bin/cargo" ]] && export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "== shellcheck (packaging, test and bench scripts)"
shellcheck packaging/*.sh packaging/debian/* scripts/*.sh bench/*.sh
echo "== cargo test"
cargo test --all-targets --locked

echo "== Autobahn|Testsuite (groups 1-7, 9, 10, and 12, 13: permessage-deflate) against tunegate serve --echo --deflate on"
cargo build --release --locked
log=$(mktemp)
# 64 MiB messages and queues: group 9 sends 16 MiB messages and expects them echoed.
target/release/tunegate serve --listen 127.0.0.1:0 --echo --deflate on \
    --max-message-size 67108864 --max-pending-output 134217728 2>"$log" &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 50); do grep -q "listening on" "$log" && break; sleep 0.1; done
addr=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$log")
[[ -n $addr ]] || { echo "test: the echo server did not start:" >&2; cat "$log" >&2; exit 1; }
bash scripts/autobahn.sh "ws://$addr" target/autobahn
kill "$server" 2>/dev/null || true

# Over TLS the deflate groups are left out: they take about 9 minutes (the Python 2 fuzzer
# compressing thousands of large messages), and TLS changes nothing in the extension.
echo "== Autobahn|Testsuite (groups 1-7, 9, 10) over wss:// (serve --echo --tls-cert, a test CA)"
certs=$(mktemp -d)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -keyout "$certs/ca.key" -out "$certs/ca.pem" -subj "/CN=tunegate test CA" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$certs/server.key" \
    -out "$certs/server.csr" -subj "/CN=127.0.0.1" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\n' >"$certs/ext"
openssl x509 -req -in "$certs/server.csr" -CA "$certs/ca.pem" -CAkey "$certs/ca.key" \
    -CAcreateserial -days 2 -extfile "$certs/ext" -out "$certs/server.pem" 2>/dev/null
: >"$log"
target/release/tunegate serve --listen 127.0.0.1:0 --echo \
    --max-message-size 67108864 --max-pending-output 134217728 \
    --tls-cert "$certs/server.pem" --tls-key "$certs/server.key" 2>"$log" &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -rf "$log" "$certs"' EXIT
for _ in $(seq 50); do grep -q "listening on" "$log" && break; sleep 0.1; done
addr=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$log")
[[ -n $addr ]] || { echo "test: the TLS echo server did not start:" >&2; cat "$log" >&2; exit 1; }
AUTOBAHN_CASES="1.* 2.* 3.* 4.* 5.* 6.* 7.* 9.* 10.*" AUTOBAHN_MIN_CASES=300 \
    bash scripts/autobahn.sh "wss://$addr" target/autobahn-wss

echo "== scaled-down proof: 20,000 connections through heartbeats and a message phase (bench/c100k.sh)"
# Fails on any connection that does not open or does not stay open, on fewer than two heartbeat
# rounds answered, and on any room message that does not reach every member.
kill "$server" 2>/dev/null || true
proof=$(mktemp -d)
BENCH_CONNS=20000 BENCH_PING_MS=2000 BENCH_PUBLISH_RATE=2000 BENCH_PUBLISH_SECONDS=3 \
    BENCH_OUT="$proof/c20k" bash bench/c100k.sh
rm -rf "$proof"

echo "== the Debian package: lintian, then install/reload/restart/upgrade/purge under systemd (packaging/test-deb.sh)"
bash packaging/test-deb.sh

echo "== across reboots and restarts: apply --persist, sysctl.d precedence, --unit, in a container (packaging/test-persistence.sh)"
bash packaging/test-persistence.sh
