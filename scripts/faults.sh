#!/usr/bin/env bash
# The fault-injection suite (issue 7): randomized runs of the embedded mode, each with one fault.
#
# `automigrate faults` builds, for every run, a local cluster of 3 nodes (network namespaces
# joined by emulated links, each node with its own storage and its own automigrate-agent daemon),
# trains the deterministic numpy trainer in a runc container on node-a under the local controller
# (policy `default` from policies/), and injects one fault drawn from the seed: kill -9 of the
# source or target agent daemon mid-transfer, the source partitioned but alive, the target dying
# during the restore, the target's disk filling up, a checkpoint truncated or bit-flipped at rest
# or damaged in flight, a valid or an invalid policy edit during the migration. Every run is
# judged on what was measured: never two copies, never a restore from damaged bytes, never a
# stuck migration, every migration ending with a reason, every file verifying, the final loss
# bit-identical to an uninterrupted run. It writes docs/faults/report.{md,json} and runs.csv
# (rewritten after every run) and exits non-zero if any run has a finding.
#
# The default, 100 runs, takes roughly 25-45 minutes on 2 cores (plus the first build). The
# smoke subset in `cargo test` is controller/embedded/tests/faults_smoke.rs.
#
# Needs root (namespaces, TUN devices, tmpfs mounts, runc, CRIU). Installs what it needs on
# Debian with scripts/install-node-deps.sh (runc, iptables, python3-numpy, CRIU 4). Safe to run
# twice: each run replaces its own storage under /var/tmp/automigrate-faults and the report.
# Arguments go to `automigrate faults` (see `automigrate faults --help`), e.g.
#   sudo scripts/faults.sh --runs 20 --seed 7 --kinds source-partition,corrupt-at-rest
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

if [[ $(id -u) -ne 0 ]]; then
    cat >&2 <<'EOT'
error: the fault-injection suite needs root: it creates network namespaces, TUN devices and
       tmpfs mounts, kills and restarts agent daemons, and runs runc and CRIU. Run it as root:
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

step "building automigrate, the automigrate-agent daemon and the embedded controller program (release)"
cargo build --release --locked -p automigrate -p automigrate-agent -p automigrate-embedded

step "checking this machine"
if ! target/release/automigrate faults --check; then
    echo "error: this machine lacks what the suite needs (listed above)." >&2
    exit 1
fi

step "automigrate faults $*"
target/release/automigrate faults "$@"
