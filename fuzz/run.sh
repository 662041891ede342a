#!/usr/bin/env bash
# Fuzz each target for a bounded time (default 60 s each): the IDX reader, the model-file
# loader, predict's image decoding and the ImageFolder pipeline's decode-crop-resize. Needs cargo-fuzz (`cargo install cargo-fuzz`); runs on
# the stable toolchain without a sanitizer (the code under test is safe Rust, so what we look
# for is panics, overflows (debug assertions are on), hangs and runaway allocations).
# usage: fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(idx checkpoint image folder_image)
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    cp -n seeds/"$t"/* "corpus/$t/" 2>/dev/null || true
    echo "== fuzzing $t for ${seconds}s"
    # Built first on its own: the run below filters its output and tolerates its exit status
    # (a crash is judged by the artifacts), which would let a target that no longer compiles pass.
    if ! cargo fuzz build --sanitizer none -O --debug-assertions "$t" >/dev/null 2>&1; then
        echo "!! $t does not build: cargo fuzz build --sanitizer none -O --debug-assertions $t"
        exit 1
    fi
    # -rss_limit_mb: a hostile input must not make us allocate gigabytes.
    cargo fuzz run --sanitizer none -O --debug-assertions "$t" "corpus/$t" -- \
        -max_total_time="$seconds" -max_len=16384 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 2>&1 |
        grep -E "^(==|#[0-9]+ *DONE|stat::number_of_executed_units|stat::peak_rss_mb|.*(panicked|ERROR|SUMMARY|Test unit written)).*" || true
    if ls artifacts/"$t"/* >/dev/null 2>&1; then
        echo "!! $t: crashing inputs in fuzz/artifacts/$t/"
        exit 1
    fi
done
echo "no crashes"
