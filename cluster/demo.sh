#!/usr/bin/env bash
# kvfabric's main job on one machine: installs what is missing, builds into build/, starts a
# local kvf-store on a free loopback port, runs a short put / get / lookup / pin / stats round
# through the kvf CLI, prints the results and stops the store (also on Ctrl-C or failure).
set -euo pipefail
cd "$(dirname "$0")/.."

cluster/deps.sh
jobs=$(nproc 2>/dev/null || echo 2)
echo "==== building into build/"
cmake --preset default >/dev/null
cmake --build build -j "$jobs" --target kvf-store kvf_cli kvf-bench >/dev/null

store_log=$(mktemp)
store_pid=
cleanup() {
  if [ -n "$store_pid" ] && kill -0 "$store_pid" 2>/dev/null; then
    kill -TERM "$store_pid"
    for _ in $(seq 50); do kill -0 "$store_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$store_pid" 2>/dev/null || true
  fi
  rm -f "$store_log"
}
trap cleanup EXIT INT TERM

echo "==== starting kvf-store (256 MiB arena, loopback)"
build/store/kvf-store --listen 127.0.0.1:0 --memory 256M >"$store_log" &
store_pid=$!
for _ in $(seq 100); do grep -q "kvf-store ready" "$store_log" && break; sleep 0.1; done
grep -q "kvf-store ready" "$store_log" || { echo "kvf-store did not start"; exit 1; }
cat "$store_log"
node=$(sed -n 's/.*listen=\([^ ]*\).*/\1/p' "$store_log")

kvf() { echo "\$ kvf $*"; build/cluster/kvf "$@"; echo; }
echo "==== a session of 1,000 tokens of model ref-tiny: 15 chunks of 64 tokens"
kvf keys --synthetic 200 --seed 7
kvf put --node "$node" --synthetic 1000 --seed 7
kvf put --node "$node" --synthetic 1000 --seed 7
echo "==== a longer request sharing that prefix finds it cached"
kvf lookup --node "$node" --synthetic 2500 --seed 7
kvf get --node "$node" --synthetic 1000 --seed 7
echo "==== pin, compress with byte-shuffled LZ4, read back, evict"
kvf pin --node "$node" --synthetic 1000 --seed 7 --lease-ms 60000
kvf compress --node "$node" --synthetic 1000 --seed 7 --codec shuffle-lz4
kvf get --node "$node" --synthetic 1000 --seed 7
kvf evict --node "$node" --synthetic 1000 --seed 7
kvf unpin --node "$node" --synthetic 1000 --seed 7
kvf evict --node "$node" --synthetic 1000 --seed 7
kvf lookup --node "$node" --synthetic 2500 --seed 7
kvf stats --node "$node"
echo "==== done; stopping kvf-store"
