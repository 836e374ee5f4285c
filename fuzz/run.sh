#!/usr/bin/env bash
# Coverage-guided fuzzing of qp2p's wire parsers with atheris (libFuzzer).
#
#   bash fuzz/run.sh [SECONDS]        (make fuzz FUZZ_SECONDS=...; default 600)
#
# Every target runs for SECONDS, all targets in parallel (one process each), from the
# committed seeds (fuzz/corpus/<target>) plus what earlier runs found
# (fuzz/corpus-gen/<target>, not committed). Crashing inputs land in
# fuzz/artifacts/<target>/, logs in fuzz/logs/. Exit status 1 if any target crashed.
#
# Environment:
#   FUZZ_TARGETS  which targets (default "frames datagrams": fuzz/fuzz_<name>.py)
#   FUZZ_NATIVE=1 also get coverage from the compiled extension's C code: a copy is
#                 cythonized and built with clang -fsanitize=fuzzer-no-link in a
#                 temporary directory (never in-tree) and checked instead of the
#                 in-tree build. Needs clang (apt-get install clang).
#   FUZZ_ARGS     extra libFuzzer flags
set -euo pipefail

seconds="${1:-600}"
targets="${FUZZ_TARGETS:-frames datagrams}"
cd "$(dirname "$0")/.."
py=.venv/bin/python
if [ ! -x "$py" ]; then
    echo "fuzz: no .venv here; run 'make build' first" >&2
    exit 2
fi
if ! "$py" -c "import atheris" 2>/dev/null; then
    echo "fuzz: installing atheris into .venv"
    .venv/bin/pip install -q atheris
fi

tmp=""
cleanup() { if [ -n "$tmp" ]; then rm -rf "$tmp"; fi; }
trap cleanup EXIT
if [ "${FUZZ_NATIVE:-0}" != "0" ]; then
    command -v clang >/dev/null || { echo "fuzz: FUZZ_NATIVE=1 needs clang" >&2; exit 2; }
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/qp2p-fuzz-native.XXXXXX")"
    suffix="$("$py" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")"
    include="$("$py" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
    echo "fuzz: building an instrumented copy of qp2p._fastpath in $tmp"
    .venv/bin/cython -3 --module-name qp2p._fastpath qp2p/_fastpath.pyx -o "$tmp/_fastpath.c"
    clang -shared -fPIC -O1 -g -fsanitize=fuzzer-no-link -I"$include" \
        "$tmp/_fastpath.c" -o "$tmp/_fastpath$suffix"
    export QP2P_FUZZ_NATIVE_EXT="$tmp/_fastpath$suffix"
fi

mkdir -p fuzz/logs
start="fuzz/logs/.started"
touch "$start"
declare -A pids
for target in $targets; do
    script="fuzz/fuzz_$target.py"
    [ -f "$script" ] || { echo "fuzz: no target $script" >&2; exit 2; }
    mkdir -p "fuzz/corpus-gen/$target" "fuzz/artifacts/$target" "fuzz/corpus/$target"
    case "$target" in
        datagrams) max_len=1600 ;;
        *) max_len=2048 ;;
    esac
    echo "fuzz: $target for ${seconds}s (log fuzz/logs/$target.log)"
    # shellcheck disable=SC2086  # FUZZ_ARGS is a list of flags
    "$py" "$script" "fuzz/corpus-gen/$target" "fuzz/corpus/$target" \
        -max_total_time="$seconds" -print_final_stats=1 -max_len="$max_len" \
        -timeout=10 -rss_limit_mb=2048 -artifact_prefix="fuzz/artifacts/$target/" \
        ${FUZZ_ARGS:-} >"fuzz/logs/$target.log" 2>&1 &
    pids[$target]=$!
done

failed=0
for target in $targets; do
    rc=0
    wait "${pids[$target]}" || rc=$?
    log="fuzz/logs/$target.log"
    echo "=== $target (exit $rc)"
    grep -m1 "compiled module under test" "$log" || true
    grep -E "^#[0-9]+[[:space:]]+(INITED|DONE)" "$log" | sed -n "1p;\$p" || true
    grep -E "^stat::" "$log" || true
    crashes=$(find "fuzz/artifacts/$target" -type f -newer "$start" | sort)
    if [ "$rc" -ne 0 ] || [ -n "$crashes" ]; then
        failed=1
        echo "CRASH in $target:"
        grep -E "^(==[0-9]+== ERROR|Mismatch|.*Error: )" "$log" | head -5 || true
        echo "${crashes:-see $log}"
    fi
done
exit "$failed"
