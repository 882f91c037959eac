#!/usr/bin/env bash
# A bounded run of every fuzz target from the fixtures' seeds (RUNS inputs or SECS seconds each,
# whichever comes first; defaults 2000 and 12, about two minutes in all):
# any crash, contract breach, hang (-timeout) or runaway allocation (-rss_limit_mb) fails it.
set -euo pipefail
cd "$(dirname "$0")"
runs=${RUNS:-2000}
secs=${SECS:-12}
targets=$(python -c 'import sys; sys.path.insert(0, "."); import targets; print(" ".join(targets.TARGETS))')
for t in $targets; do
    work=$(mktemp -d)
    echo "fuzz $t ($runs inputs)"
    python run.py "$t" -atheris_runs="$runs" -max_total_time="$secs" -timeout=20 -rss_limit_mb=6144 -max_len=65536 \
        -artifact_prefix="$work/" "$work" 2>&1 | grep -E "^#[0-9]+ +DONE|Done [0-9]+ runs|crash|ERROR|Error|Traceback" | tail -3 || true
    if ls "$work"/crash-* "$work"/timeout-* "$work"/oom-* >/dev/null 2>&1; then
        echo "fuzz $t: crash inputs in $work" >&2
        exit 1
    fi
    rm -rf "$work"
done
