#!/usr/bin/env bash
# Installs the Debian packages kvfabric needs to build, test and run its benchmarks, where they are
# missing. As root it runs apt-get; otherwise it prints the exact apt-get line and fails.
# KVF_DEPS=present skips the check: for hosts where the libraries were installed without dpkg
# (unpacked into a prefix named by PKG_CONFIG_PATH); the build then says what it lacks.
# docs/dependencies.md says why each package is there.
set -euo pipefail

pkgs=(
  build-essential cmake pkg-config git
  clang clang-format
  libxxhash-dev liblz4-dev libzmq3-dev libjansson-dev libmsgpack-dev libmsgpuck-dev
  libmicrohttpd-dev
  libopenblas-dev libibverbs-dev librdmacm-dev libcmocka-dev libhiredis-dev
  libcurl4-openssl-dev libsodium-dev libsystemd-dev liburing-dev
  python3 python3-xxhash python3-msgpack python3-torch
  redis-server gnuplot-nox iproute2
)
# Wanted by a test but not needed to build or run: installed where apt-get can, its test skipped
# where not (prometheus, for promtool: test_metrics; fio, the peer of kvf-bench disk; etcd-server,
# for membership: test_etcd, and clusters whose file asks for etcd).
optional=(prometheus fio etcd-server)

[ "${KVF_DEPS:-}" = present ] && exit 0

missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
opt_missing=()
for p in "${optional[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    opt_missing+=("$p")
  fi
done
install_optional() {
  [ ${#opt_missing[@]} -eq 0 ] || [ "$(id -u)" -ne 0 ] && return 0
  apt-get install -y -qq --no-install-recommends "${opt_missing[@]}" >/dev/null 2>&1 ||
    echo "kvfabric: could not install ${opt_missing[*]} (optional: its tests are skipped)" >&2
}
if [ ${#missing[@]} -eq 0 ]; then
  if [ ${#opt_missing[@]} -gt 0 ] && [ "$(id -u)" -eq 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || true
    install_optional
  fi
  exit 0
fi

line="apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "kvfabric: missing packages: ${missing[*]}" >&2
  echo "kvfabric: run as root:  apt-get update && $line" >&2
  exit 1
fi
echo "kvfabric: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
install_optional
