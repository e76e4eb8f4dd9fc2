#!/usr/bin/env bash
# The README's main command: real failures, migrations and resumes on this machine.
#
# `automigrate demo` builds, for every run, a local Kubernetes cluster of real components: 4
# nodes (network namespaces joined by emulated links of 10/20/30 ms), each with its own
# automigrate-kubelet (runc, the kubelet checkpoint API) and automigrate-agent pod, and a control
# plane namespace with automigrate-apiserver and two automigrate-controller replicas (leader
# election), configured as deploy/ configures them (controller/embedded/src/kube). It applies the
# numpy trainer as a Pod with automigrate.dev/ annotations (examples/demo-trainer-pod.yaml) and
# the demo policies (examples/demo-policies.yaml), then only acts on the world: powers node-a off
# at 25/50/75 % of training, sets a node-problem-detector condition on it, or writes the user's
# latency on the pod. Every checkpoint, replica and migration is the controller's; the report
# reads each Migration back from the API server. It writes docs/demo/report.{md,json,csv} and
# two SVG plots, and exits non-zero if any check failed (identical final loss, resumed at the
# checkpoint, never two copies in any node's runc state, dataset verified on the target).
# A run takes about 10 minutes on 2 otherwise idle cores, plus the first build.
#
# Needs root (namespaces, TUN devices, runc, CRIU) and kubectl. Installs what it needs on Debian
# with scripts/install-node-deps.sh (runc, iptables, python3-numpy, CRIU 4). Safe to run twice:
# each run replaces its own cluster state under /dev/shm/automigrate-demo (kept with --keep:
# component logs in <run>/logs/, `kubectl --kubeconfig <run>/kubeconfig get migrations -A`) and
# the report in docs/demo/.
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

step "kubectl (the demo drives and reads the local cluster with it)"
if ! command -v kubectl >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    # Debian's kubernetes-client speaks the legacy discovery the local API server serves.
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client
fi
if ! command -v kubectl >/dev/null 2>&1; then
    echo "error: kubectl is not on PATH (https://kubernetes.io/docs/tasks/tools/); the demo cannot run." >&2
    exit 1
fi

step "building automigrate and the local cluster's programs (release): apiserver, kubelet, agent, controller"
cargo build --release --locked -p automigrate -p automigrate-apiserver -p automigrate-kubelet \
    -p automigrate-agent -p automigrate-operator

step "checking this machine"
if ! target/release/automigrate demo --check; then
    echo "error: this machine lacks what the demo needs (listed above)." >&2
    exit 1
fi

step "automigrate demo $*"
target/release/automigrate demo "$@"
