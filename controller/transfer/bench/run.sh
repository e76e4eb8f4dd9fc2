#!/usr/bin/env bash
# The transfer benchmark of docs/transfer.md: this engine against a tar stream, scp and rsync
# across emulated links (automigrate-netem: two network namespaces, delay, loss, rate cap).
#
#   controller/transfer/bench/run.sh                 # the full matrix (hours)
#   controller/transfer/bench/run.sh --rtt 70ms --loss 0.001 --cc cubic   # one slice
#
# Needs root (namespaces, TUN). Installs openssh-server/-client and rsync when missing; adds
# the congestion controls it uses to net.ipv4.tcp_allowed_congestion_control (tar, scp and
# rsync cannot pick one per socket, so the namespaces' default must be allowed). Results are
# appended to $OUT (JSON lines; cells already there are skipped, so an interrupted run
# resumes), and the tables are printed at the end. Any arguments go to `transfer-bench run`.
set -euo pipefail
cd "$(dirname "$0")/../../.."

if [[ $(id -u) -ne 0 ]]; then
    echo "the benchmark needs root (network namespaces, TUN devices)" >&2
    exit 1
fi
missing=()
command -v /usr/sbin/sshd >/dev/null || missing+=(openssh-server)
command -v ssh-keygen >/dev/null || missing+=(openssh-client)
command -v rsync >/dev/null || missing+=(rsync)
command -v tar >/dev/null || missing+=(tar)
if ((${#missing[@]})); then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

cargo build --release -p automigrate-transfer --example transfer-cli --example transfer-bench

WORK=${WORK:-/var/tmp/automigrate-bench}
OUT=${OUT:-$WORK/results.jsonl}
mkdir -p "$WORK"
target/release/examples/transfer-bench run --work "$WORK" --out "$OUT" "$@"
target/release/examples/transfer-bench table "$OUT"
