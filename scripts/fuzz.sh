#!/usr/bin/env bash
# Fuzzes every decoder that reads untrusted input, each for RUNS executions (default 1,000,000),
# from seed corpora written by fuzz/src/make_seeds.rs. Installs nightly and cargo-fuzz if needed;
# safe to run twice (the corpus grows). Findings land in fuzz/artifacts/<target>/ and make the
# script fail. Usage: scripts/fuzz.sh [RUNS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

runs="${1:-1000000}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(policy annotations transfer_frame alertmanager)
fi

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "==> installing the nightly toolchain (cargo-fuzz needs it for sanitizers)"
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

echo "==> building the fuzz targets (nightly, AddressSanitizer)"
for target in "${targets[@]}"; do
    cargo +nightly fuzz build "$target"
done

echo "==> writing seed corpora"
cargo +nightly run --quiet --bin make-seeds

summary=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    echo "==> fuzzing $target for $runs executions"
    log="$(mktemp)"
    # -rss_limit_mb and -malloc_limit_mb make an unbounded allocation a finding, not a slow run.
    status=0
    cargo +nightly fuzz run "$target" "corpus/$target" -- \
        -runs="$runs" -rss_limit_mb=2048 -malloc_limit_mb=512 -timeout=10 \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    grep -E '^(#[0-9]+ +(INITED|DONE)|SUMMARY|stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb))' "$log" || true
    if [ "$status" -ne 0 ]; then
        tail -40 "$log" >&2
        echo "!! $target: a finding (exit $status); see fuzz/artifacts/$target/" >&2
        summary+=("$target FAILED")
        continue
    fi
    execs="$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}')"
    summary+=("$target ok: ${execs:-?} executions")
    rm -f "$log"
done

echo
echo "==> summary"
printf '  %s\n' "${summary[@]}"
if printf '%s\n' "${summary[@]}" | grep -q FAILED; then
    exit 1
fi
