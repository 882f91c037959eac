#!/usr/bin/env bash
# Builds the Rust readers' fuzz targets (cargo-fuzz, libFuzzer), replays each target's crash
# corpus (regressions/TARGET/*, every input that once broke the contract), then fuzzes it from
# the fixtures' seeds for RUNS inputs or SECS seconds, whichever comes first (defaults 3000 and
# 15, about two minutes in all once built): any panic, abort, hang (-timeout) or runaway
# allocation (-rss_limit_mb, -malloc_limit_mb, the targets' own allocation cap) fails it.
#
# SANITIZER=address builds with AddressSanitizer, which needs a nightly toolchain; the default
# (none) builds on the stable one. TARGETS="a b" picks targets. The corpus grows under CORPUS
# and crash inputs are kept under ARTIFACTS (both default to a temporary folder); a longer
# campaign is this script with RUNS=-1 SECS=300 CORPUS=corpus ARTIFACTS=artifacts.
set -euo pipefail
cd "$(dirname "$0")"
runs=${RUNS:-3000}
secs=${SECS:-15}
sanitizer=${SANITIZER:-none}
flags=(-timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512)

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
toolchain=()
[ "$sanitizer" = none ] || toolchain=(+nightly)
# 16 codegen units build the instrumented candle in two thirds of the time, for slightly slower runs.
cargo ${toolchain[@]+"${toolchain[@]}"} fuzz build --fuzz-dir . -s "$sanitizer" --codegen-units 16
bin="target/$(rustc -vV | sed -n 's/^host: //p')/release"
targets=${TARGETS:-$(cargo ${toolchain[@]+"${toolchain[@]}"} fuzz list --fuzz-dir .)}

# Each input is written to scratch files and read back: in memory (/dev/shm) that is about
# thirty times faster than on disk, where the smoke would spend most of its time in the file system.
work=$(mktemp -d -p /dev/shm 2>/dev/null || mktemp -d)
trap 'rm -rf "$work"' EXIT
artifacts=${ARTIFACTS:-$work/artifacts}
corpus=${CORPUS:-$work/corpus}
mkdir -p "$artifacts"
# The targets write each input to a scratch folder under TMPDIR; it goes with the run.
export TMPDIR="$work"
python3 seed.py "$work/seeds"

failed=()
for t in $targets; do
    regressions=(regressions/"$t"/*)
    if [ -e "${regressions[0]}" ]; then
        echo "fuzz $t: ${#regressions[@]} regression input(s)"
        if ! "$bin/$t" "${flags[@]}" -artifact_prefix="$artifacts/$t-" "${regressions[@]}" \
            >"$work/$t.log" 2>&1; then
            tail -30 "$work/$t.log" >&2
            failed+=("$t (regressions)")
            continue
        fi
    fi
    dict=json.dict
    [ "$t" = gguf_file ] && dict=gguf.dict
    echo "fuzz $t ($runs inputs or ${secs}s)"
    mkdir -p "$corpus/$t"
    if ! "$bin/$t" "${flags[@]}" -runs="$runs" -max_total_time="$secs" -dict="$dict" \
        -artifact_prefix="$artifacts/$t-" "$corpus/$t" "$work/seeds/$t" \
        >"$work/$t.log" 2>&1; then
        tail -30 "$work/$t.log" >&2
        failed+=("$t")
        continue
    fi
    grep -E "^#[0-9]+[[:space:]]+DONE" "$work/$t.log" | tail -1 || true
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: crashes in ${failed[*]}; inputs:" >&2
    ls "$artifacts" >&2
    if [ -z "${ARTIFACTS:-}" ]; then
        kept=$(mktemp -d)
        cp -r "$artifacts" "$kept/"
        echo "(copied to $kept/artifacts)" >&2
    fi
    exit 1
fi
