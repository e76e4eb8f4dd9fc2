#!/usr/bin/env bash
# The fault-injection suite (issues 7 and 12): randomized runs of the local cluster of real
# components, each with one fault.
#
# `automigrate faults` builds, for every run, a local cluster (crate automigrate-embedded, module
# kube): automigrate-apiserver and two automigrate-controller replicas in a control network
# namespace, 3 nodes each with an automigrate-kubelet running the node's automigrate-agent pod,
# joined by emulated links. It applies the protected training pod (the deterministic numpy
# trainer) to node-a and injects one fault drawn from the seed: kill -9 of the leading controller
# in a migration phase, kill -9 or SIGSTOP of the source or target agent, the target powered off
# during the restore, the target's disk filling up, a checkpoint truncated or bit-flipped at rest
# or damaged in flight, damaged pieces under a resumed transfer, a valid or an invalid edit of the
# policy ConfigMap, and the home node cut off from the API server but alive with each fencing
# mode (the known split brain, reported on its own lines and never counted as passing), and
# issue 16's kinds in the default self-fence mode at drawn moments: the node cut off from the API
# server (api-cut), from its peers only (peer-cut), or powered off (power-off), each run's
# downtime and the per-kind median/max in the report (--jobs N runs N clusters at once). Every run
# is judged on what was measured: never two copies (runc on every node), never a restore from
# damaged bytes, never a stuck migration (read from the API server), every migration ending with
# a reason, every file verifying, the final loss bit-identical to an uninterrupted run. It writes
# docs/faults/local-cluster/report.{md,json} and runs.csv (rewritten after every run) and exits
# non-zero if any counted run has a finding.
#
# A run takes 1-2 minutes on 2 cores (a cluster per run, real-time failure detection); 100 runs
# take hours. The smoke subset in `cargo test` is controller/embedded/tests/faults_smoke.rs.
#
# Needs root (namespaces, TUN devices, tmpfs mounts, runc, CRIU) and kubectl. Installs what it
# needs on Debian with scripts/install-node-deps.sh (runc, iptables, python3-numpy, CRIU 4). Safe
# to run twice: each run replaces its own state under /dev/shm/automigrate-faults and the report.
# Arguments go to `automigrate faults` (see `automigrate faults --help`), e.g.
#   sudo scripts/faults.sh --runs 20 --seed 7 --kinds api-cut-taint,corrupt-at-rest
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

if [[ $(id -u) -ne 0 ]]; then
    cat >&2 <<'EOT'
error: the fault-injection suite needs root: it creates network namespaces, TUN devices and
       tmpfs mounts, runs a local cluster of runc containers and CRIU. Run it as root:
       sudo scripts/faults.sh
EOT
    exit 1
fi
need_rust_toolchain

step "node dependencies (runc, iptables, python3-numpy, CRIU 4 from Debian trixie)"
if ! scripts/install-node-deps.sh; then
    echo "error: could not install the node dependencies (see above); the suite cannot run." >&2
    exit 1
fi

step "building automigrate and the local cluster's components (release)"
cargo build --release --locked -p automigrate -p automigrate-apiserver -p automigrate-kubelet \
    -p automigrate-agent -p automigrate-operator

step "checking this machine"
if ! target/release/automigrate faults --check; then
    echo "error: this machine lacks what the suite needs (listed above)." >&2
    exit 1
fi

step "automigrate faults $*"
target/release/automigrate faults "$@"
