#!/usr/bin/env bash
# The project's test command: what CI runs (.ci/run) and what a developer runs before pushing.
# It installs what the tests need, then runs every check: formatting, lints, all tests, and the
# example policies. Run it from anywhere; it works in the repository it belongs to.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "system packages"
# The namespace tests run real daemons: they need ip, ping and wg, and nft to read the host
# firewall back. The store tests run a real etcd. Building etcd-client needs protoc and the
# protobuf well-known types. The metrics tests parse scrapes with the Prometheus project's
# Python client. The map's page is checked in a real headless Chromium.
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v ping >/dev/null || need+=(iputils-ping)
command -v wg >/dev/null || need+=(wireguard-tools)
command -v nft >/dev/null || need+=(nftables)
command -v etcd >/dev/null || need+=(etcd-server)
command -v protoc >/dev/null || need+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
/usr/bin/python3 -c 'import prometheus_client' 2>/dev/null || need+=(python3-prometheus-client)
command -v chromium >/dev/null || need+=(chromium)
if ((${#need[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

step "toolchain"
for c in rustfmt clippy; do
  if ! cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$c"
  fi
done
cargo --version

step "cargo deny: licences, banned and duplicate crates, sources, advisories (deny.toml)"
if ! cargo deny --version 2>/dev/null | grep -q '^cargo-deny 0\.20\.'; then
  cargo install cargo-deny --locked --version 0.20.2
fi
cargo deny check licenses bans sources
# RustSec advisories, offline, against the database snapshot in deny/ (its age is printed).
scripts/advisories.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build the binaries (end-to-end tests run them)"
cargo build --workspace --bins --locked

step "build the fuzz targets (run them with cargo fuzz; see docs/operations.md)"
cargo build --manifest-path fuzz/Cargo.toml --target-dir target --locked

step "cargo test"
cargo test --workspace --locked

step "the data plane's in-process tests again, every node split into 3 shards"
# (--workspace, so that features unify as in the step above and nothing is built again)
BULKHEAD_TEST_SHARDS=3 cargo test --workspace --locked --test pair --test hostile

step "example policies"
for f in deploy/examples/*.yaml; do
  target/debug/bulkhead policy check "$f"
done
