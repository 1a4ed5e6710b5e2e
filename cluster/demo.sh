#!/usr/bin/env bash
# kvfabric's main job on one machine: installs what is missing, builds into build/, starts a local
# cluster (3 kvf-store, kvf-sched, 2 prefill and 2 decode kvf-engine; cluster/demo.json), replays
# part of Mooncake's conversation trace through it with kvfabric and with the baseline (the same
# engines with their own prefix cache, no store), alternately over several repetitions, prints
# the summary, the verdict on each target and where the records and plots are, and shuts the
# cluster down (also on Ctrl-C or failure). Exit status: 0 all targets met, 3 the replay ran and a
# target was missed (kvfabric worse than the baseline at a percentile judged), else a failure.
#
#   cluster/demo.sh [--netns] [kvf-bench e2e options, e.g. --max-requests 100]
#
# --netns runs every process in a network namespace of its own (needs root); the rest goes to
# kvf-bench e2e after the demo's defaults, so it overrides them.
set -euo pipefail
cd "$(dirname "$0")/.."

netns=()
extra=()
for a in "$@"; do
  if [ "$a" = "--netns" ]; then netns=(--netns); else extra+=("$a"); fi
done

cluster/deps.sh
jobs=$(nproc 2>/dev/null || echo 2)
echo "==== building into build/"
cmake --preset default >/dev/null
cmake --build build -j "$jobs" --target kvf-store kvf-sched kvf-engine kvf_cli kvf-bench >/dev/null

config=cluster/demo.json
kvf=build/bin/kvf
down() { "$kvf" cluster down --config "$config" || true; }
trap down EXIT
trap 'exit 130' INT TERM

echo "==== starting the cluster ($config)"
"$kvf" cluster up --config "$config" "${netns[@]}"
"$kvf" cluster status --config "$config"

# 200 requests of the trace from #1000 (about 75 s of it) arrive 3x faster than recorded, after
# the 500 before them have been prefilled into the stores (a running deployment's cache is warm).
# Each 512-token trace block becomes 64 tokens and each output 1/8 of its length (at most 64), so
# the 2-core reference engines keep up. kvfabric and the baseline run alternately, 3 times each,
# every run from the state the warm-up left; the baseline's engines are warmed the same way.
echo "==== replaying the trace with kvfabric and with the baseline, alternately"
# --require-targets: exit status 3 when the verdict finds kvfabric worse at any percentile judged.
status=0
build/bin/kvf-bench e2e --config "$config" --trace data/traces/conversation_head1600.jsonl \
  --start 1000 --warmup 500 --max-requests 200 --repetitions 3 --time-scale 3 --block-tokens 64 \
  --max-input 4096 --max-output 64 --slo-ttft-ms 2000 --require-targets \
  --out build/cluster/demo/e2e "${extra[@]}" || status=$?

echo "==== the stores after the run"
# The stores authenticate every client: the cluster's admin credential reads their counters.
for node in $(python3 -c 'import json,sys; print(" ".join(json.load(open(sys.argv[1]))["stores"]))' \
  build/cluster/demo/state.json); do
  KVF_CREDENTIAL=build/cluster/demo/admin.cred "$kvf" stats --node "$node" | head -4
done
plots="not drawn (gnuplot missing or failed)"
if [ -s build/cluster/demo/e2e/ttft_cdf.png ]; then
  plots="build/cluster/demo/e2e/ttft_cdf.png, build/cluster/demo/e2e/throughput.png"
fi
echo "==== summary: build/cluster/demo/e2e/summary.json; plots: $plots;" \
  "records: build/cluster/demo/e2e/records.csv"
# The verdict again, last: each target judged on the median of the repetitions' ratios.
[ -s build/cluster/demo/e2e/summary.json ] && python3 - build/cluster/demo/e2e/summary.json <<'EOF'
import json, sys
res = json.load(open(sys.argv[1]))
targets = res.get("targets")
if not targets:
    print("==== verdict: none (both modes are needed)")
    sys.exit(0)
print("==== verdict, kvfabric / baseline (median of %d repetitions [10th, 90th percentile]):"
      % res["repetitions"])
for key, name in (("ttft_p50_ratio", "TTFT p50"), ("ttft_p90_ratio", "TTFT p90"),
                  ("ttft_p99_ratio", "TTFT p99"), ("requests_per_s_ratio", "throughput")):
    t = targets[key]
    print("  %-10s %.3f [%.3f, %.3f]  target %s: %s (in %d of %d repetitions)"
          % (name, t["median"], t["p10"], t["p90"], t["target"],
             "met" if t["met"] else "NOT met", t["met_in_repetitions"], t["repetitions"]))
print("  all targets met: %s" % ("yes" if res["targets_met"] else "NO"))
# Not judged: the percentiles the verdict does not look at (p1 to p99, repetitions pooled).
by = res.get("ttft_by_percentile")
if by:
    noise = ""
    if by["slower_at"] and "beyond_noise_at" in by:  # a bootstrap of the requests (kvf-bench)
        noise = ("; beyond the requests' sampling noise at %s" % by["beyond_noise_ranges"]
                 if by["beyond_noise_at"] else "; within the requests' sampling noise")
    print("  TTFT p1 to p99, not judged: %s%s" % (
        "kvfabric slower at %s (worst %.2fx at p%d)"
        % (by["slower_ranges"], by["worst_ratio"], by["worst_at"])
        if by["slower_at"] else "kvfabric slower at none", noise))
EOF
echo "==== stopping the cluster"
case $status in
  0) ;;
  3) echo "==== the demo ran, and kvfabric missed a target (exit status 3)" ;;
  *) echo "==== the replay failed (exit status $status): see the messages above" ;;
esac
exit "$status"
