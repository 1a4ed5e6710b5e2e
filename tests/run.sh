#!/usr/bin/env bash
# kvfabric's test suite, as CI runs it: installs missing dependencies, checks formatting, then
# builds and runs every test twice, in the release build (build/) and under ASan+UBSan
# (build/asan) and ThreadSanitizer (build/tsan), then the libFuzzer targets for a bounded time
# where clang is present.
# Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
jobs=$(nproc 2>/dev/null || echo 2)
fuzz_seconds=${KVF_FUZZ_SECONDS:-30}

# Each step says how long the suite has run so far: CI allows 20 minutes on 2 cores.
step() { printf '\n==== %s (%dm%02ds in)\n' "$*" $((SECONDS / 60)) $((SECONDS % 60)); }

# The reference engine's GEMMs (OpenBLAS) run on one thread in every build, as kvf cluster runs
# its engines: OpenBLAS's own workers wait for work by spinning on sched_yield, and with ctest
# running two tests at once on two cores each test's workers took the cores its daemons and I/O
# threads needed (test_engine under ASan: 70 s with them, 19 s without). The engine's results
# do not depend on the thread count; its tests check results, not GEMM speed.
export OPENBLAS_NUM_THREADS=1

step "dependencies"
cluster/deps.sh

step "clang-format check"
mapfile -t sources < <(git ls-files '*.c' '*.h' 2>/dev/null || find . -name '*.[ch]' -not -path './build/*')
clang-format --dry-run --Werror "${sources[@]}"
echo "${#sources[@]} files formatted"

step "release build (build/)"
cmake --preset default -DKVF_WERROR=ON >/dev/null
cmake --build build -j "$jobs"
step "release tests"
(cd build && ctest --output-on-failure -j "$jobs")

step "ASan + UBSan build (build/asan)"
cmake --preset asan -DKVF_WERROR=ON -DKVF_PLAIN_LIBKVF="$root/build/libkvf.so" >/dev/null
cmake --build build/asan -j "$jobs"
step "ASan + UBSan tests"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
(cd build/asan && ctest --output-on-failure -j "$jobs")

# The TSan build leaves the RDMA transport out (-DKVF_RDMA=OFF): it is the check that kvfabric
# builds and runs without the RDMA headers; the others test it against mocked verbs.
step "ThreadSanitizer build (build/tsan, without RDMA)"
cmake --preset tsan -DKVF_WERROR=ON -DKVF_RDMA=OFF -DKVF_PLAIN_LIBKVF="$root/build/libkvf.so" >/dev/null
cmake --build build/tsan -j "$jobs"
step "ThreadSanitizer tests"
# OpenBLAS (Debian's, not built with TSan) synchronises its own GEMM worker threads by spinning
# on shared flags that TSan cannot see; with one OpenBLAS thread (exported above) it starts none,
# and every thread of ours (client I/O, connector workers, store loops) stays fully checked.
# libzmq's hand-over of sockets to its I/O thread is likewise invisible to TSan: tests/tsan.supp
# suppresses reports inside libzmq only.
(cd build/tsan && TSAN_OPTIONS="halt_on_error=1 suppressions=$root/tests/tsan.supp" ctest --output-on-failure -j "$jobs")

if [ -d tests/fuzz ] && ls tests/fuzz/*.c >/dev/null 2>&1 && command -v clang >/dev/null; then
  step "fuzzing (${fuzz_seconds}s per target, the targets side by side)"
  cmake --preset fuzz -DKVF_WERROR=ON >/dev/null
  cmake --build build/fuzz -j "$jobs" --target fuzz_targets
  fuzzing=()
  for t in build/fuzz/tests/fuzz_*; do
    [ -f "$t" ] && [ -x "$t" ] || continue
    corpus="build/fuzz/corpus/$(basename "$t")"
    mkdir -p "$corpus"
    "$t" -max_total_time="$fuzz_seconds" "$corpus" "$root/tests/fuzz/seeds/$(basename "$t")" \
      > "$corpus.log" 2>&1 &
    fuzzing+=("$!:$t")
  done
  found=0
  for f in "${fuzzing[@]}"; do
    if wait "${f%%:*}"; then
      echo "${f#*:}: $(tail -1 "build/fuzz/corpus/$(basename "${f#*:}").log")"
    else
      found=1
      echo "${f#*:} failed:"
      tail -40 "build/fuzz/corpus/$(basename "${f#*:}").log"
    fi
  done
  [ "$found" = 0 ]
fi

step "all suites passed"
