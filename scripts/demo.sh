#!/usr/bin/env bash
# The README's main command. Until the embedded single-machine mode lands, it replays the example
# cluster snapshot through the decision engine and prints every decision with its reasons.
# Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

need_rust_toolchain
step "building automigrate (release)"
cargo build --release --locked -p automigrate
step "automigrate plan --snapshot examples/cluster-snapshot.yaml --policies policies/"
target/release/automigrate plan --snapshot examples/cluster-snapshot.yaml --policies policies/ "$@"
