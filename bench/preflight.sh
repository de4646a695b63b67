#!/usr/bin/env bash
# How long `tunegate preflight` takes, inside a fresh network namespace (goal: under 20 ms),
# next to procps `sysctl` reading the same keys in the same run as a floor for "read a few
# /proc/sys files from a new process". Results: bench/results/preflight.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x "$HOME/.cargo/bin/cargo" ]] && export PATH="$HOME/.cargo/bin:$PATH"
command -v hyperfine >/dev/null || { apt-get update -qq && apt-get install -y -qq hyperfine >/dev/null; }
command -v sysctl >/dev/null || { apt-get update -qq && apt-get install -y -qq procps >/dev/null; }
cargo build --release --locked -q
bin=$PWD/target/release/tunegate
mkdir -p bench/results
ns=tgbench-$$
ip netns add "$ns"
trap 'ip netns del "$ns"' EXIT
keys="net.core.somaxconn net.ipv4.tcp_max_syn_backlog net.ipv4.ip_local_port_range \
net.ipv4.ip_local_reserved_ports net.ipv4.tcp_rmem net.ipv4.tcp_wmem net.core.rmem_max \
net.core.wmem_max fs.file-max fs.nr_open net.netfilter.nf_conntrack_max \
net.ipv4.ip_unprivileged_port_start"
# -N: no shell in between; -i: preflight exits 1 on a failing host, which is the point here.
ip netns exec "$ns" hyperfine -N -i --warmup 20 --runs 500 \
    --export-markdown bench/results/preflight.md --export-json bench/results/preflight.json \
    -n "tunegate preflight --profile c100k" "$bin preflight --profile c100k" \
    -n "tunegate preflight --profile c100k --format json" "$bin preflight --profile c100k --format json" \
    -n "sysctl (procps) reading the same 12 keys" "sysctl $keys"
cat bench/results/preflight.md
