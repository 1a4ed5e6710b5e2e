#!/usr/bin/env bash
# kvfabric's main job on one machine: installs what is missing, builds into build/, starts a local
# cluster (3 kvf-store, kvf-sched, 2 prefill and 2 decode kvf-engine; cluster/demo.json), replays
# part of Mooncake's conversation trace through it with kvfabric and again without it, prints the
# summary and where the records and plots are, and shuts the cluster down (also on Ctrl-C or
# failure).
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

# 400 requests of the trace from #1000 (about 140 s of it) arrive 3x faster than recorded, after
# the 500 before them have been prefilled into the stores (a running deployment's cache is warm;
# the run without kvfabric has none). Each 512-token trace block becomes 64 tokens and each
# output 1/8 of its length (at most 64), so the 2-core reference engines keep up.
echo "==== replaying the trace with and without kvfabric"
build/bin/kvf-bench e2e --config "$config" --trace data/traces/conversation_head1600.jsonl \
  --start 1000 --warmup 500 --max-requests 400 --time-scale 3 --block-tokens 64 \
  --max-input 4096 --max-output 64 --out build/cluster/demo/e2e "${extra[@]}"

echo "==== the stores after the run"
for node in $(python3 -c 'import json,sys; print(" ".join(json.load(open(sys.argv[1]))["stores"]))' \
  build/cluster/demo/state.json); do
  "$kvf" stats --node "$node" | head -4
done
echo "==== summary: build/cluster/demo/e2e/summary.json; plots: build/cluster/demo/e2e/ttft_cdf.png," \
  "build/cluster/demo/e2e/throughput.png; records: build/cluster/demo/e2e/records.csv"
echo "==== stopping the cluster"
