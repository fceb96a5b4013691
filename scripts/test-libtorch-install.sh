#!/usr/bin/env bash
# Exercises scripts/libtorch.sh from nothing, as a new machine would run it,
# in fresh temporary caches (never the cache the build uses):
#
#   1. two installers started at once into one empty cache both succeed and
#      leave one complete libtorch, which the listing check accepts;
#   2. an install killed while it unpacks leaves nothing that looks complete,
#      and the next run finishes it;
#   3. a package that cannot be fetched fails in one line naming it, with
#      nothing complete left behind.
#
#   scripts/test-libtorch-install.sh      (about 1 minute; downloads 540 MB once)
#
# .ci/run runs it on every submission: CI's machine keeps its cache, so this
# is the only place where the fresh-cache path runs there.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
started=$SECONDS

# check CONDITION MESSAGE: both are evaluated, the message only on failure
# (so that it may read the files of a process that has just ended).
check() {
    if ! eval "$1"; then
        echo "test-libtorch-install: FAILED: $(eval "echo \"$2\"")" >&2
        exit 1
    fi
}

complete_install() {
    local prefix=$1/libtorch-2.11.0
    check "[ -f '$prefix/.complete' ]" "$prefix/.complete is missing"
    check "[ -f '$prefix/torch/lib/libtorch_cpu.so' ] && [ -f '$prefix/torch/include/torch/script.h' ]" \
        "$prefix lacks libtorch_cpu.so or torch/script.h"
    check "[ -f '$prefix/nvidia/cu13/lib/libcudart.so.13' ]" "$prefix lacks the CUDA runtime"
    # The installer's own count, checked again here from the files on disk.
    local listed found
    listed=$(cut -d' ' -f1 "$prefix/.complete")
    found=$(find "$prefix" -type f ! -name .complete ! -name build-version | wc -l)
    check "[ '$listed' = '$found' ]" "$prefix holds $found files, the wheels list $listed"
    check "[ -z \"\$(ls -d '$1'/.libtorch-*.partial.* 2>/dev/null)\" ]" "a partial install was left in $1"
}

# 1. Two at once into one empty cache.
cache=$work/concurrent
SIMCLR_CACHE=$cache scripts/libtorch.sh >"$work/a.out" 2>"$work/a.err" &
first=$!
SIMCLR_CACHE=$cache scripts/libtorch.sh >"$work/b.out" 2>"$work/b.err" &
second=$!
check "wait $first" "the first concurrent install failed: \$(cat $work/a.err)"
check "wait $second" "the second concurrent install failed: \$(cat $work/b.err)"
check "cmp -s '$work/a.out' '$work/b.out'" "the two installs printed different environments"
check "grep -q \"LIBTORCH='$cache/libtorch-2.11.0/torch'\" '$work/a.out'" "unexpected output: \$(cat $work/a.out)"
check "grep -q 'waiting for another install' '$work/a.err' '$work/b.err'" "neither install waited for the other"
complete_install "$cache"
echo "1. two concurrent installs: one complete libtorch ($(cut -d' ' -f1 "$cache/libtorch-2.11.0/.complete") files), $((SECONDS - started)) s"

# 2. Killed while unpacking (the wheels are copied in, so only the unpacking
# is timed), then run again.
cache=$work/killed
mkdir -p "$cache"
cp -r "$work/concurrent/wheels" "$cache/wheels"
setsid env SIMCLR_CACHE="$cache" scripts/libtorch.sh >/dev/null 2>&1 &
installer=$!
for _ in $(seq 600); do
    if [ -n "$(find "$cache" -path '*.partial.*/torch/lib/*' -print -quit 2>/dev/null)" ]; then
        break
    fi
    sleep 0.05
done
check "[ -n \"\$(ls -d '$cache'/.libtorch-*.partial.* 2>/dev/null)\" ]" "the install never began to unpack"
# (bash's "Killed" report of the job goes to the null device too)
exec 3>&2 2>/dev/null
kill -KILL -- "-$installer"
wait "$installer" || true
exec 2>&3 3>&-
check "[ ! -e '$cache/libtorch-2.11.0' ]" "a killed install left $cache/libtorch-2.11.0"
SIMCLR_CACHE=$cache scripts/libtorch.sh >/dev/null 2>"$work/c.err" ||
    check false "the install after a kill failed: \$(cat $work/c.err)"
complete_install "$cache"
echo "2. killed while unpacking: nothing complete was left, the next run finished it"

# 3. A registry that has nothing: one line naming the package, exit 1.
cache=$work/unreachable
status=0
SIMCLR_CACHE=$cache PIP_INDEX_URL=http://127.0.0.1:9/simple PIP_FIND_LINKS= PIP_RETRIES=0 PIP_TIMEOUT=2 \
    scripts/libtorch.sh >/dev/null 2>"$work/d.err" || status=$?
check "[ '$status' = 1 ]" "an unreachable registry gave exit status $status"
check "grep -q '^scripts/libtorch.sh: downloading torch==2.11.0 failed: ' '$work/d.err'" \
    "the failure does not name the package: \$(cat $work/d.err)"
check "[ ! -e '$cache/libtorch-2.11.0' ]" "a failed download left $cache/libtorch-2.11.0"
echo "3. failed download: $(grep '^scripts/libtorch.sh' "$work/d.err")"
echo "test-libtorch-install: all 3 checks passed in $((SECONDS - started)) s"
