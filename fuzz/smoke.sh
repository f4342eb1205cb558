#!/usr/bin/env bash
# Runs every cargo-fuzz target (chunk_decode, ring_recover: whatever `cargo fuzz list` shows)
# for a short while; exits non-zero if any target crashes (panic, failed assertion, timeout,
# out-of-memory) or fails to build.
#
#   fuzz/smoke.sh            # 30 s per target
#   fuzz/smoke.sh 120        # 120 s per target
#   FUZZ_TOOLCHAIN=nightly-2026-05-01 fuzz/smoke.sh
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`).
# New inputs go to a scratch corpus under fuzz/target/, the committed seeds in
# fuzz/corpus/<target>/ are only read. Crash inputs land in fuzz/artifacts/<target>/.
set -euo pipefail

secs="${1:-30}"
toolchain="${FUZZ_TOOLCHAIN:-nightly}"
cd "$(dirname "$0")"

if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -eq 0 ]; then
    echo "usage: $0 [SECONDS>0]" >&2
    exit 2
fi
if ! cargo "+$toolchain" fuzz --version >/dev/null 2>&1; then
    echo "smoke.sh: needs cargo-fuzz and the $toolchain toolchain:" >&2
    echo "  rustup toolchain install $toolchain && cargo install cargo-fuzz --locked" >&2
    exit 2
fi

mapfile -t targets < <(cargo "+$toolchain" fuzz list)
if [ "${#targets[@]}" -eq 0 ]; then
    echo "smoke.sh: no fuzz targets found" >&2
    exit 2
fi

# Extra libFuzzer options per target. ring_recover's inputs are 3 control bytes and a region
# of 16 KiB: without a larger -max_len (libFuzzer's default is 4096 here) the fuzzer never
# mutates the blocks past the first 4 KiB of it.
declare -A extra=(
    [ring_recover]="-max_len=16387"
)

failed=()
for t in "${targets[@]}"; do
    scratch="target/smoke-corpus/$t"
    mkdir -p "$scratch" "corpus/$t"
    echo "=== fuzz $t for ${secs}s"
    # The first corpus directory receives new inputs; the seed directory is only read.
    # -rss_limit_mb stays at libFuzzer's default (2048); -timeout flags a slow input (hang).
    # shellcheck disable=SC2086 # word splitting of the extra options is intended
    if cargo "+$toolchain" fuzz run "$t" "$scratch" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 ${extra[$t]:-}; then
        echo "=== $t: no crash in ${secs}s"
    else
        echo "=== $t: FAILED (see fuzz/artifacts/$t/)" >&2
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "smoke.sh: crashing targets: ${failed[*]}" >&2
    exit 1
fi
echo "smoke.sh: ${#targets[@]} target(s), no crash"
