#!/usr/bin/env bash
# The engine alone on loopback (no emulated link): what CPU and disk work per transfer costs,
# e.g. the receiver's verification. Used for the "Cost of whole-file verification" numbers
# of docs/transfer.md.
#
#   controller/transfer/bench/loopback.sh [-n RUNS] [-d large,small] BIN [BIN ...]
#
# BIN is a built `transfer-cli` example (`cargo build --release -p automigrate-transfer
# --example transfer-cli`; copy it aside to compare two versions). With several BINs the runs
# alternate (A B A B ...), so a drift in the machine's speed hits each alike. Each run starts
# a receiver (`--exit-after 1`) into an empty destination, then times `send` from its start
# to its exit: the sender exits when the receiver answers `Complete`, i.e. once every file is
# synced, verified and renamed. Datasets as in the benchmark: large 4 × 64 MiB, small
# 600 × 432 KiB, incompressible. Prints one line per run, then the median, min and max per
# BIN and dataset, with the receiving process's CPU time (user + system, /usr/bin/time),
# which is less disturbed by other work on the machine, and its `bytes_rechecked` (bytes read
# again at placement) per run.
# Needs only coreutils, diff and awk.
set -euo pipefail

runs=5
datasets=large,small
while getopts n:d: flag; do
    case $flag in
    n) runs=$OPTARG ;;
    d) datasets=$OPTARG ;;
    *) exit 2 ;;
    esac
done
shift $((OPTIND - 1))
(($# > 0)) || {
    echo "usage: $0 [-n RUNS] [-d large,small] BIN [BIN ...]" >&2
    exit 2
}

WORK=${WORK:-/var/tmp/automigrate-loopback}
PORT=${PORT:-7849}
mkdir -p "$WORK"
"$1" certs --out "$WORK/pki" >/dev/null
tls=(--ca "$WORK/pki/ca.pem")

make_dataset() { # name count size_bytes
    local dir=$WORK/src-$1
    [[ -f $dir.complete ]] && return
    rm -rf "$dir"
    mkdir -p "$dir"
    for ((i = 0; i < $2; i++)); do
        head -c "$3" /dev/urandom >"$dir/f$(printf %04d "$i")"
    done
    touch "$dir.complete"
}
make_dataset large 4 $((64 << 20))
make_dataset small 600 $((432 << 10))

results=$WORK/times.txt
: >"$results"
IFS=, read -ra names <<<"$datasets"
for ((run = 1; run <= runs; run++)); do
    for name in "${names[@]}"; do
        for bin in "$@"; do
            dest=$WORK/dst
            rm -rf "$dest"
            mkdir -p "$dest"
            sync
            /usr/bin/time -f "%U %S" -o "$WORK/cpu.txt" \
                "$bin" receive --listen "127.0.0.1:$PORT" --dest "$dest" --exit-after 1 "${tls[@]}" \
                --cert "$WORK/pki/node-b.pem" --key "$WORK/pki/node-b-key.pem" --stats \
                >"$WORK/stats.json" 2>/dev/null &
            receiver=$!
            for _ in $(seq 100); do
                (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
                sleep 0.05
            done
            start=$(date +%s%N)
            "$bin" send --to "127.0.0.1:$PORT" "${tls[@]}" --cert "$WORK/pki/node-a.pem" \
                --key "$WORK/pki/node-a-key.pem" --chunk-size 256KiB --quiet "$WORK/src-$name" \
                >/dev/null
            end=$(date +%s%N)
            wait "$receiver"
            diff -rq -x .automigrate-staging "$WORK/src-$name" "$dest" >/dev/null || {
                echo "$bin $name: the destination differs from the source" >&2
                exit 1
            }
            seconds=$(awk -v ns=$((end - start)) 'BEGIN { printf "%.3f", ns / 1e9 }')
            # Bytes read again at placement (receivers that count them).
            rechecked=$(grep -o '"bytes_rechecked":[0-9]*' "$WORK/stats.json" | cut -d: -f2 || true)
            cpu=$(awk '{ printf "%.2f", $1 + $2 }' "$WORK/cpu.txt")
            echo "run $run $name $bin ${seconds}s receiver-cpu=${cpu}s rechecked=${rechecked:--}"
            echo "$name $bin $seconds $cpu" >>"$results"
        done
    done
done
rm -rf "$WORK/dst"

summary() { # column label
    echo "$2: dataset bin median min max (seconds, $runs runs)"
    for name in "${names[@]}"; do
        for bin in "${bins[@]}"; do
            awk -v n="$name" -v b="$bin" -v c="$1" '$1 == n && $2 == b { print $c }' \
                "$results" | sort -g |
                awk -v n="$name" -v b="$bin" '{ t[NR] = $1 }
                    END { m = (NR % 2) ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2
                          printf "%s %s %.3f %.3f %.3f\n", n, b, m, t[1], t[NR] }'
        done
    done
}
bins=("$@")
summary 3 "send wall time"
summary 4 "receiver CPU (user + system)"
