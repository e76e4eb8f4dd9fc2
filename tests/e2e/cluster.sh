#!/usr/bin/env bash
# End-to-end on a real cluster: install automigrate, run a protected training pod, kill its node,
# and check that the Migration succeeds and the replacement resumed training from a checkpoint.
#
# NOT RUN BY CI, AND NEVER RUN ON THE PROJECT'S OWN MACHINES: they have no Kubernetes API server,
# no container engine and no image registry (see tests/e2e/README.md). Everything below was
# written against the Kubernetes, kind, containerd and CRI-O documentation and checked only as far
# as a machine without a cluster can (`bash -n`, shellcheck, `kubectl kustomize`). Treat a first
# run as the first test of this script, too.
#
# Opt-in: it does nothing (exit 0, saying why) unless AUTOMIGRATE_E2E_CLUSTER=1 and KUBECONFIG
# points at a readable kubeconfig. See tests/e2e/README.md for the cluster it needs and the
# other variables.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SYSTEM_NS=automigrate-system
TEST_NS=${AUTOMIGRATE_E2E_NAMESPACE:-automigrate-e2e}
CONTROLLER_IMAGE=ghcr.io/automigrate/automigrate-controller:0.1.0
AGENT_IMAGE=ghcr.io/automigrate/automigrate-agent:0.1.0
CHECKPOINT_ANNOTATION='checkpoint\.automigrate\.dev/latest'

say() { printf '[e2e] %s\n' "$*"; }
fail() {
    printf '\n[e2e] FAILED: %s\n' "$*" >&2
    exit 1
}
skip() {
    printf '[e2e] SKIPPED: %s\n' "$*"
    exit 0
}

# --- 0. Opt-in ------------------------------------------------------------------------------
[[ ${AUTOMIGRATE_E2E_CLUSTER:-} == 1 ]] ||
    skip "AUTOMIGRATE_E2E_CLUSTER is not 1: this test installs software into a cluster and kills one of its nodes, so it runs only when asked."
[[ -n ${KUBECONFIG:-} ]] || skip "KUBECONFIG is not set: no cluster to test against."
[[ -r $KUBECONFIG ]] || skip "KUBECONFIG=$KUBECONFIG is not a readable file."
for tool in kubectl openssl; do
    command -v "$tool" >/dev/null || fail "$tool is not installed."
done

# Run from anywhere; every path below is relative to the repository.
cd "$REPO"

# Waits until "$@" succeeds, every 5 s, at most $timeout seconds; says what it waits for.
wait_until() {
    local what=$1 timeout=$2
    shift 2
    local deadline=$((SECONDS + timeout))
    say "waiting (up to ${timeout}s) for $what"
    until "$@"; do
        ((SECONDS < deadline)) || fail "timed out after ${timeout}s waiting for $what"
        sleep 5
    done
}

# "containerd://2.1.1" or "cri-o://1.33.0" -> "containerd 2 1" / "cri-o 1 33".
runtime_version() {
    sed -E 's#^([a-z-]+)://v?([0-9]+)\.([0-9]+).*#\1 \2 \3#' <<<"$1"
}

# --- 1. The cluster -----------------------------------------------------------------------------
kubectl version >/dev/null 2>&1 || fail "the API server in $KUBECONFIG does not answer (kubectl version)."
server_minor=$(kubectl get --raw /version | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p')
((server_minor >= 30)) ||
    fail "Kubernetes 1.$server_minor: the kubelet checkpoint API (ContainerCheckpoint) is on by default from 1.30."

# Workers: Ready nodes without the control-plane role.
mapfile -t workers < <(kubectl get nodes -l '!node-role.kubernetes.io/control-plane' \
    -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
    awk '$2 == "True" { print $1 }')
((${#workers[@]} >= 2)) ||
    fail "need at least 2 Ready worker nodes (the source and a target), found ${#workers[@]}."
say "workers: ${workers[*]}"

for node in "${workers[@]}"; do
    version=$(kubectl get node "$node" -o jsonpath='{.status.nodeInfo.containerRuntimeVersion}')
    read -r runtime major minor <<<"$(runtime_version "$version")"
    case $runtime in
        containerd)
            ((major > 2 || (major == 2 && minor >= 1))) ||
                fail "$node runs $version: restoring from a checkpoint image needs containerd 2.1 or newer."
            ;;
        cri-o) ;;
        *) fail "$node runs $version: only containerd (2.1 or newer) and CRI-O restore checkpoint images." ;;
    esac
done

# kind names its node containers after the nodes, and says so in the providerID.
provider=$(kubectl get node "${workers[0]}" -o jsonpath='{.spec.providerID}')
if [[ $provider == kind://* ]]; then
    kind_cluster=$(cut -d/ -f4 <<<"$provider")
    for tool in docker kind; do
        command -v "$tool" >/dev/null || fail "this is kind cluster $kind_cluster, and $tool is not installed."
    done
    say "kind cluster: $kind_cluster"
else
    kind_cluster=
    [[ -n ${AUTOMIGRATE_E2E_KILL_NODE:-} ]] ||
        fail "not a kind cluster: set AUTOMIGRATE_E2E_KILL_NODE to a command that powers a node off, with {node} for its name (see tests/e2e/README.md)."
    [[ ${AUTOMIGRATE_E2E_SKIP_BUILD:-} == 1 ]] ||
        fail "not a kind cluster: load the two images onto every node yourself (README), then set AUTOMIGRATE_E2E_SKIP_BUILD=1."
    [[ -n ${AUTOMIGRATE_E2E_KUSTOMIZE:-} ]] ||
        fail "not a kind cluster: set AUTOMIGRATE_E2E_KUSTOMIZE to an overlay of deploy/ that sets the agent's --image-import-command for your runtime (README)."
fi

# containerd and CRI-O call CRIU on the node to dump and restore.
if [[ -n $kind_cluster ]]; then
    for node in "${workers[@]}"; do
        if ! docker exec "$node" criu --version >/dev/null 2>&1; then
            [[ ${AUTOMIGRATE_E2E_INSTALL_CRIU:-} == 1 ]] ||
                fail "$node has no criu on PATH. Set AUTOMIGRATE_E2E_INSTALL_CRIU=1 to install CRIU 4 into the kind nodes with scripts/install-node-deps.sh."
            say "installing CRIU into $node"
            docker cp scripts/install-node-deps.sh "$node:/tmp/install-node-deps.sh"
            docker exec "$node" bash /tmp/install-node-deps.sh
        fi
        say "$node: $(docker exec "$node" criu --version | head -1)"
    done
fi

# --- 2. Images ----------------------------------------------------------------------------------
if [[ ${AUTOMIGRATE_E2E_SKIP_BUILD:-} != 1 ]]; then
    say "building $CONTROLLER_IMAGE and $AGENT_IMAGE (Containerfile; compiles the workspace)"
    docker build -f Containerfile --target controller -t "$CONTROLLER_IMAGE" .
    docker build -f Containerfile --target agent -t "$AGENT_IMAGE" .
    for image in "$CONTROLLER_IMAGE" "$AGENT_IMAGE"; do
        kind load docker-image "$image" --name "$kind_cluster"
    done
fi
# --- 3. Install ---------------------------------------------------------------------------------
kubectl apply -f deploy/namespace.yaml
secret_exists() { kubectl -n "$SYSTEM_NS" get secret "$1" >/dev/null 2>&1; }
random_token() { openssl rand -hex 32; }
for name in automigrate-agent-token automigrate-webhook-token; do
    secret_exists "$name" ||
        kubectl -n "$SYSTEM_NS" create secret generic "$name" --from-literal=token="$(random_token)"
done
if ! secret_exists automigrate-agent-tls; then
    # One certificate per node name (peers check it against the node they meant to reach), as
    # deploy/agent.yaml expects: ca.pem, <node>.pem, <node>-key.pem.
    pki_dir=$(mktemp -d)
    # shellcheck disable=SC2046 # one --node flag per node, split on purpose
    if command -v docker >/dev/null && docker image inspect "$AGENT_IMAGE" >/dev/null 2>&1; then
        docker run --rm -v "$pki_dir:/pki" --entrypoint automigrate "$AGENT_IMAGE" \
            transfer certs --out /pki --days 7 $(kubectl get nodes -o name | sed 's|node/|--node |')
    else
        cargo run --release --quiet -p automigrate -- \
            transfer certs --out "$pki_dir" --days 7 $(kubectl get nodes -o name | sed 's|node/|--node |')
    fi
    kubectl -n "$SYSTEM_NS" create secret generic automigrate-agent-tls --from-file="$pki_dir/"
    rm -rf "$pki_dir"
fi

overlay=${AUTOMIGRATE_E2E_KUSTOMIZE:-tests/e2e/kind}
manifests=$(kubectl kustomize "$overlay")
if ! kubectl get crd servicemonitors.monitoring.coreos.com prometheusrules.monitoring.coreos.com \
    podmonitors.monitoring.coreos.com >/dev/null 2>&1; then
    say "no prometheus-operator CRDs: leaving out the ServiceMonitor, PodMonitor and PrometheusRule"
    manifests=$(awk '
        function flush() { if (doc != "" && doc !~ /\nkind: (ServiceMonitor|PodMonitor|PrometheusRule)\n/) printf "%s", doc; doc = "" }
        /^---$/ { flush(); doc = "---\n"; next }
        { doc = doc $0 "\n" }
        END { flush() }' <<<"$(printf -- '---\n%s\n' "$manifests")")
fi
kubectl apply -f - <<<"$manifests"
kubectl -n "$SYSTEM_NS" rollout status deployment/automigrate-controller --timeout=5m
kubectl -n "$SYSTEM_NS" rollout status daemonset/automigrate-agent --timeout=5m

# --- 4. The protected training pod on the first worker -----------------------------------------
source_node=${workers[0]}
cordoned=()
cleanup() {
    local status=$?
    for node in "${cordoned[@]}"; do kubectl uncordon "$node" >/dev/null 2>&1 || true; done
    if [[ ${AUTOMIGRATE_E2E_KEEP:-} != 1 ]]; then
        if [[ ${killed:-} == 1 && -n $kind_cluster ]]; then
            say "starting $source_node again"
            docker start "$source_node" >/dev/null || true
        fi
        kubectl delete namespace "$TEST_NS" --ignore-not-found --wait=false >/dev/null 2>&1 || true
    fi
    exit "$status"
}
trap cleanup EXIT

kubectl create namespace "$TEST_NS" --dry-run=client -o yaml | kubectl apply -f -
# Cordon the other workers so the scheduler has only the source to choose; the replacement is
# pinned by the controller and ignores cordons made for this.
for node in "${workers[@]:1}"; do
    kubectl cordon "$node" >/dev/null
    cordoned+=("$node")
done
kubectl -n "$TEST_NS" apply -f deploy/examples/training-pod.yaml
kubectl -n "$TEST_NS" wait --for=condition=Ready pod/trainer --timeout=5m
for node in "${cordoned[@]}"; do kubectl uncordon "$node" >/dev/null; done
cordoned=()
scheduled=$(kubectl -n "$TEST_NS" get pod trainer -o jsonpath='{.spec.nodeName}')
[[ $scheduled == "$source_node" ]] || fail "trainer landed on $scheduled, not $source_node"
say "trainer runs on $source_node"

epochs_of() { sed -n 's/^epoch=\([0-9]*\) .*/\1/p'; }
last_epoch() { kubectl -n "$TEST_NS" logs "$1" | epochs_of | tail -1; }

# A checkpoint held on two nodes: taken on the source and replicated to a standby.
holders() {
    kubectl -n "$TEST_NS" get pod trainer -o jsonpath="{.metadata.annotations.$CHECKPOINT_ANNOTATION}" |
        sed -n 's/.*"heldOn":\[\([^]]*\)\].*/\1/p' | tr ',' '\n' | grep -c . || true
}
replicated() { (($(holders) >= 2)); }
wait_until "a checkpoint of trainer held on two nodes" 420 replicated
checkpoint=$(kubectl -n "$TEST_NS" get pod trainer -o jsonpath="{.metadata.annotations.$CHECKPOINT_ANNOTATION}")
epoch_at_checkpoint=$(last_epoch trainer)
say "checkpoint: $checkpoint (trainer was at epoch $epoch_at_checkpoint)"

# --- 5. Kill the source node --------------------------------------------------------------------
source_log=$(kubectl -n "$TEST_NS" logs trainer)
epoch_before_kill=$(epochs_of <<<"$source_log" | tail -1)
say "killing $source_node at epoch $epoch_before_kill"
killed=1
if [[ -n $kind_cluster ]]; then
    docker stop "$source_node" >/dev/null
else
    sh -c "${AUTOMIGRATE_E2E_KILL_NODE//\{node\}/$source_node}"
fi

# --- 6. The Migration ---------------------------------------------------------------------------
migration_state() {
    kubectl -n "$TEST_NS" get migrations.automigrate.dev -l migration.automigrate.dev/pod=trainer \
        -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.phase}{"\n"}{end}' 2>/dev/null
}
last_seen=
migration_done() {
    local state
    state=$(migration_state)
    if [[ $state != "$last_seen" ]]; then
        say "migration: ${state:-none yet}"
        last_seen=$state
    fi
    case $state in
        *" Succeeded"*) return 0 ;;
        *" Failed"* | *" RolledBack"* | *" Restarted"*)
            kubectl -n "$TEST_NS" get migrations.automigrate.dev -o yaml >&2
            fail "the migration ended ${state##* } instead of Succeeded"
            ;;
    esac
    return 1
}
wait_until "the Migration of trainer to succeed" 900 migration_done
migration=$(migration_state | awk '$2 == "Succeeded" { print $1; exit }')
replacement=$(kubectl -n "$TEST_NS" get migrations.automigrate.dev "$migration" -o jsonpath='{.status.replacementPod}')
target=$(kubectl -n "$TEST_NS" get pod "$replacement" -o jsonpath='{.spec.nodeName}')
[[ -n $replacement && $target != "$source_node" ]] || fail "replacement '$replacement' is on '$target'"
kubectl -n "$TEST_NS" get migrations.automigrate.dev "$migration"

# --- 7. Training resumed ------------------------------------------------------------------------
replacement_progresses() { (($(last_epoch "$replacement") >= first_epoch + 2)); }
first_epoch=$(kubectl -n "$TEST_NS" logs "$replacement" | epochs_of | head -1)
[[ -n $first_epoch ]] || fail "$replacement logged no epoch"
((first_epoch > 1)) ||
    fail "$replacement started at epoch $first_epoch: training restarted from scratch instead of resuming"
((first_epoch <= epoch_before_kill + 1)) ||
    fail "$replacement starts at epoch $first_epoch, after the source's last epoch $epoch_before_kill"
wait_until "$replacement to train on" 60 replacement_progresses

# The trainer is deterministic: an epoch logged by both the source and the replacement (the
# ones between the checkpoint and the kill, done twice) must be the same line.
restored_log=$(kubectl -n "$TEST_NS" logs "$replacement")
mismatches=$(comm -12 <(epochs_of <<<"$source_log" | sort -u) <(epochs_of <<<"$restored_log" | sort -u) |
    while read -r epoch; do
        [[ $(grep -m1 "^epoch=$epoch " <<<"$source_log") == "$(grep -m1 "^epoch=$epoch " <<<"$restored_log")" ]] ||
            echo "$epoch"
    done)
[[ -z $mismatches ]] || fail "epochs logged differently before and after the restore: $mismatches"

say "PASSED: $source_node killed at epoch $epoch_before_kill; migration $migration moved trainer to" \
    "$target as $replacement, which resumed at epoch $first_epoch (a restart would log epoch 1)"
