#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian 12 machine, and fails loudly when
# something cannot be had. Idempotent: a second run installs nothing.
set -euo pipefail

need_apt=()
command -v ip >/dev/null || need_apt+=(iproute2)
command -v unshare >/dev/null || need_apt+=(util-linux)
command -v gcc >/dev/null || need_apt+=(gcc)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v curl >/dev/null || need_apt+=(curl)
# The kill tests (tests/kills.rs) inject SIGKILL at chosen system calls with strace.
command -v strace >/dev/null || need_apt+=(strace)
# The bus tests start a Redis 7 Cluster on loopback (scripts/redis-cluster.sh).
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v redis-cli >/dev/null || need_apt+=(redis-tools)
# The fleet tests put a real nginx in front of the hosts (packaging/nginx/tunegate.conf).
[[ -x /usr/sbin/nginx ]] || command -v nginx >/dev/null || need_apt+=(nginx)
# The daemon's metrics are checked with promtool (Debian ships it in the prometheus package;
# policy-rc.d below keeps its server from starting).
command -v promtool >/dev/null || need_apt+=(prometheus)
# The package test (packaging/test-deb.sh): lintian, and a Debian 12 root booted with nspawn.
command -v lintian >/dev/null || need_apt+=(lintian)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
command -v systemd-nspawn >/dev/null || need_apt+=(systemd-container)
command -v shellcheck >/dev/null || need_apt+=(shellcheck)
# The TLS tests make their CA and certificates with openssl.
command -v openssl >/dev/null || need_apt+=(openssl)
# Node's `ws` is one of the clients the TLS tests drive (tests/clients/tls_ws.js).
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
if ((${#need_apt[@]})); then
    echo "deps: installing ${need_apt[*]}"
    [[ $(id -u) == 0 ]] || { echo "deps: need root to apt-get install ${need_apt[*]}" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    # No package may start a service of its own (redis-server would start one on port 6379 and
    # leave it running): the tests start every server they need and stop it after.
    own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
    ((own_policy)) && rm -f /usr/sbin/policy-rc.d
fi

if ! command -v cargo >/dev/null; then
    [[ -x "$HOME/.cargo/bin/cargo" ]] && export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || { echo "deps: cargo not found (install Rust with rustup)" >&2; exit 1; }
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        echo "deps: adding rust component $component"
        rustup component add "$component"
    fi
done

# Clients we did not write, for the server tests.
# PyJWT (with cryptography, for EdDSA and RS256) mints tokens tunegate did not make.
if ! python3 -c 'import websockets, msgpack, jwt, cryptography' 2>/dev/null; then
    echo "deps: installing Python websockets, msgpack, PyJWT and cryptography"
    python3 -m pip install --quiet --disable-pip-version-check websockets msgpack 'pyjwt[crypto]==2.15.1'
fi
python3 -c 'import websockets, msgpack, jwt, cryptography' \
    || { echo "deps: Python websockets/msgpack/PyJWT/cryptography missing" >&2; exit 1; }
# Node `ws`, pinned, in a folder of its own (the tests set NODE_PATH to it).
test_node=$HOME/.cache/tunegate/test-node
if ! NODE_PATH=$test_node/node_modules node -e 'if (require("ws/package.json").version !== "8.23.0") process.exit(1)' 2>/dev/null; then
    echo "deps: installing Node ws@8.23.0 into $test_node"
    mkdir -p "$test_node"
    timeout 300 npm install --prefix "$test_node" --save-exact --no-audit --no-fund --loglevel=error ws@8.23.0 >/dev/null
fi
NODE_PATH=$test_node/node_modules node -e 'require("ws")' || { echo "deps: Node ws missing in $test_node" >&2; exit 1; }
command -v prlimit >/dev/null || { echo "deps: prlimit (util-linux) missing" >&2; exit 1; }
redis-server --version | grep -q 'v=[7-9]\.' || { echo "deps: redis-server 7 or later is needed" >&2; exit 1; }

[[ $(id -u) == 0 ]] || { echo "deps: the namespace tests need root" >&2; exit 1; }
ip netns list >/dev/null || { echo "deps: ip netns does not work here" >&2; exit 1; }
unshare -n true || { echo "deps: unshare -n does not work here (no CAP_SYS_ADMIN?)" >&2; exit 1; }
echo "deps: ok"
