#!/usr/bin/env bash
# The README's main command: real failures, migrations and resumes on this machine.
#
# `automigrate demo` builds a local cluster of 4 nodes (network namespaces joined by emulated
# links of 10/20/30 ms, each node with its own storage and its own automigrate-agent daemon),
# trains a small numpy model in a runc container on node-a, and lets the local controller (the
# same engine and migration state machine as the Kubernetes controller, with the policies in
# policies/) checkpoint it with CRIU, replicate the checkpoints, and move it when node-a fails
# (at 25/50/75 % of training), degrades, or its user moves away. It writes
# docs/demo/report.{md,json,csv} and two SVG plots, and exits non-zero if any check failed
# (identical final loss, resumed at the checkpoint, never two copies, dataset verified on the
# target). A run takes about 4-7 minutes on 2 cores, plus the first build.
#
# Needs root (namespaces, TUN devices, runc, CRIU). Installs what it needs on Debian with
# scripts/install-node-deps.sh (runc, iptables, python3-numpy, CRIU 4). Safe to run twice: each
# run replaces its own storage under /var/tmp/automigrate-demo and the report in docs/demo/.
# Arguments go to `automigrate demo` (see `automigrate demo --help`), e.g.
#   sudo scripts/demo.sh --scenarios hard-failure --failure-points 50
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

if [[ $(id -u) -ne 0 ]]; then
    cat >&2 <<'EOF'
error: the demo needs root: it creates network namespaces and TUN devices and runs runc and
       CRIU. Run it as root:  sudo scripts/demo.sh
       (Without root you can still see what the engine decides for an example cluster:
        cargo run -p automigrate -- plan --snapshot examples/cluster-snapshot.yaml --policies policies/)
EOF
    exit 1
fi
need_rust_toolchain

step "node dependencies (runc, iptables, python3-numpy, CRIU 4 from Debian trixie)"
if ! scripts/install-node-deps.sh; then
    echo "error: could not install the node dependencies (see above); the demo cannot run." >&2
    exit 1
fi

step "building automigrate and the automigrate-agent daemon (release)"
cargo build --release --locked -p automigrate -p automigrate-agent

step "checking this machine"
if ! target/release/automigrate demo --check; then
    echo "error: this machine lacks what the demo needs (listed above)." >&2
    exit 1
fi

step "automigrate demo $*"
target/release/automigrate demo "$@"
