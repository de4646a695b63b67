#!/usr/bin/env bash
# The C1M run (issue 22): bench/c100k.sh with the c1m profile and a million connections, both
# ends on this host. In a namespace it creates: `tunegate apply --profile c1m` (its
# per-namespace keys; the host-global ones are reported, not changed), `tunegate run` sized by
# the profile, then `tunegate load -n 1000000` from 127.0.0.2 onwards: connect, join rooms of
# 10, hold through two heartbeat rounds at Socket.IO's 25 s / 20 s, a room phase (1,000
# messages/s by default: 9,000 deliveries/s, beside a million connections' heartbeats on the
# same two cores), and a check that every connection is still open. Writes bench/results/c1m.{md,json}; fails on any
# connection or delivery lost or fewer than two heartbeat rounds. Every BENCH_* variable of
# bench/c100k.sh applies (BENCH_CONNS for a smaller attempt; BENCH_NS_EHASH=2097152 gives the
# namespace an established-socket hash of its own, see bench/lib.sh).
#
# Needs about 10 GB of kernel memory per million connections (both ends), a load generator
# process and a server worker per ~20,000 descriptors (RLIMIT_NOFILE here), and fs.file-max
# above two descriptors per connection: bench/c1m-on-host.yaml is c1m with
# `clients_on_host: true`, so preflight's derived.file_max_both_ends and
# derived.socket_memory count both ends.
set -euo pipefail
cd "$(dirname "$0")/.."
export BENCH_PROFILE=bench/c1m-on-host.yaml
export BENCH_CONNS=${BENCH_CONNS:-1000000}
export BENCH_PUBLISH_RATE=${BENCH_PUBLISH_RATE:-1000}
export BENCH_OUT=${BENCH_OUT:-bench/results/c1m}
# Every connection names its room (`?affinity=ROOM`), so each room of 10 lives on one worker:
# BENCH_AFFINITY=0 for the kernel's spread (each member on its own worker, most likely).
export BENCH_AFFINITY=${BENCH_AFFINITY:-1}
# Connecting slows as the host's socket count grows (from 20,000/s to a few thousand a second
# past 800,000 here): 300 s, so the run shows how many this host holds, not only how many it
# opens in two minutes.
export BENCH_CONNECT_TIMEOUT=${BENCH_CONNECT_TIMEOUT:-300}
exec bash bench/c100k.sh
