#!/usr/bin/env bash
# The README's test command: installs what the tests need, then runs every check CI runs.
# Safe to run twice. Set AUTOMIGRATE_SKIP_PRIVILEGED=1 to skip (loudly) tests that need root,
# CRIU or network namespaces on a machine that lacks them; CI never sets it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

need_rust_toolchain
# A CI run builds once from a clean clone: incremental caches would only add tens of GB.
if [[ -n ${CI:-} ]]; then
    export CARGO_INCREMENTAL=0
fi
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "node dependencies (runc, iptables, python3-numpy, CRIU 4 from Debian trixie)"
if [[ ${AUTOMIGRATE_SKIP_PRIVILEGED:-} == 1 ]]; then
    echo "AUTOMIGRATE_SKIP_PRIVILEGED=1: node dependencies not installed; privileged tests will be SKIPPED" >&2
else
    scripts/install-node-deps.sh
fi
step "kubectl (the local API server's test runs the real client against it)"
if ! command -v kubectl >/dev/null 2>&1 && [[ ${AUTOMIGRATE_SKIP_PRIVILEGED:-} != 1 ]] \
    && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    # Debian's kubernetes-client (kubectl 1.20) speaks the legacy discovery the server serves.
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client
fi
if command -v kubectl >/dev/null 2>&1; then
    kubectl version --client
elif [[ ${AUTOMIGRATE_SKIP_PRIVILEGED:-} == 1 ]]; then
    echo "!!! kubectl is not on PATH: the kubectl test of automigrate-apiserver will be SKIPPED !!!" >&2
else
    echo "error: kubectl is not on PATH; controller/apiserver/tests/kubectl.rs needs it (https://kubernetes.io/docs/tasks/tools/)." >&2
    echo "       Set AUTOMIGRATE_SKIP_PRIVILEGED=1 to skip that test loudly." >&2
    exit 1
fi
step "cargo test"
# The local cluster's tests start the workspace's programs (API server, kubelet, agent,
# controller, kubectl-migrate): build every binary first.
cargo build --locked --workspace --bins
cargo test --workspace --locked
