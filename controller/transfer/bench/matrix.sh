#!/usr/bin/env bash
# The benchmark matrix of docs/transfer.md, pruned to fit about 50 minutes on a 2-core
# machine (a full matrix of every tool on every cell at full size takes hours, mostly waiting
# for single-stream tools on lossy links). Phases, most important first; all append to one
# JSON-lines file, and cells already in it are skipped, so an interrupted run resumes.
#
#   1. The goal cell, 70 ms / 0.1 % loss / CUBIC, full size: large with every tool (engine 3
#      runs; the four single-stream tools stopped at 125 s, which is still 10× the engine's
#      time), medium with the engine.
#   2. Many small files, full size (600 × 432 KiB), on all 16 links with every tool, since the
#      "never worse than 1.05× the best peer" goal holds at any RTT; tools stopped at 25 s
#      (about 2× the engine's time, so a stopped peer cannot be within 1.05× of it). Full
#      size, because halving it doubles the weight of the engine's fixed costs (handshakes,
#      fsyncs) against a tar stream that syncs nothing.
#   3. Large and medium at half size on the other 15 links: the engine and tar (the fastest
#      single-stream tool) only, stopped at 25 s.
#
# Measurement processes run at nice -10: other work shares the 2 cores (the load average is
# recorded with every run). Needs root; run bench/run.sh once first to install the tools.
set -euo pipefail
cd "$(dirname "$0")/../../.."
# SKIP_BUILD=1 uses the binaries already built (the shared target dir may be locked for a
# while by other builds).
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    cargo build --release -p automigrate-transfer --example transfer-cli --example transfer-bench
fi
B=target/release/examples/transfer-bench
WORK=${WORK:-/var/tmp/automigrate-bench}
OUT=${OUT:-controller/transfer/bench/results/matrix.jsonl}
COMMON=(--work "$WORK" --out "$OUT" --chunk-size 256KiB --max-streams 64)
run() { nice -n -10 "$B" run "${COMMON[@]}" "$@"; }

# 1. The goal cell.
run --cc cubic --loss 0.001 --rtt 70ms --datasets large --tools adaptive --repeat 3
run --cc cubic --loss 0.001 --rtt 70ms --datasets large --tools blind,single,tar,scp,rsync --timeout 125s
run --cc cubic --loss 0.001 --rtt 70ms --datasets medium --tools adaptive,blind --timeout 125s
# 2. Many small files, every link, every tool.
run --cc cubic,bbr --loss 0,0.001 --rtt 10ms,20ms,30ms,70ms --datasets small \
    --tools adaptive,single,tar,scp,rsync --timeout 25s
run --cc cubic --loss 0.001 --rtt 10ms,20ms,30ms,70ms --datasets small --tools blind --timeout 25s
# 3. Large and medium, the other links, the engine against tar.
run --cc cubic,bbr --loss 0,0.001 --rtt 10ms,20ms,30ms,70ms --datasets large,medium --scale 0.5 \
    --tools adaptive,tar --timeout 25s

"$B" table "$OUT"
"$B" plot "$OUT" --out docs/transfer-bench.svg
