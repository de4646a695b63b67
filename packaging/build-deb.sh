#!/usr/bin/env bash
# Builds the Debian package: the release binary, man pages and completions generated from the
# clap definitions (packaging/assets.rs), then cargo-deb (metadata in Cargo.toml), then lintian,
# which must report no errors and no warnings. Prints the .deb's path on stdout.
# Installs cargo-deb and lintian when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x "$HOME/.cargo/bin/cargo" ]] && export PATH="$HOME/.cargo/bin:$PATH"
log() { printf 'build-deb: %s\n' "$*" >&2; }

if ! cargo deb --version >/dev/null 2>&1; then
    log "installing cargo-deb"
    cargo install cargo-deb --locked --version 3.8.0 >&2
fi
if ! command -v lintian >/dev/null; then
    log "installing lintian"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lintian >/dev/null
fi

cargo build --release --locked >&2
rm -rf target/assets
cargo run --release --locked --example assets -- target/assets >&2
# Every tunegate page a page refers to (SUBCOMMANDS, SEE ALSO) must exist.
missing=$(grep -oh 'tunegate[a-z\\-]*(1)' target/assets/man/*.1 | sed 's/\\-/-/g; s/(1)$//' | sort -u |
    while read -r page; do [[ -f target/assets/man/$page.1 ]] || echo "$page(1)"; done)
[[ -z $missing ]] || { log "man pages refer to pages that are not generated: $missing"; exit 1; }
gzip -9n target/assets/man/*.1
# Not `tee /dev/stderr`: reopening /dev/stderr truncates it when it is a file (a CI log).
out=$(cargo deb --no-build --locked 2>&1) || { printf '%s\n' "$out" >&2; log "cargo deb failed"; exit 1; }
printf '%s\n' "$out" >&2
deb=$(tail -n 1 <<<"$out")
[[ -f $deb ]] || { log "cargo deb did not say where the package is"; exit 1; }
log "lintian $deb"
# --fail-on warning: a warning fails the build like an error (overrides, each with its reason,
# live in packaging/lintian-overrides).
lintian --fail-on error,warning --info "$deb" >&2
echo "$deb"
