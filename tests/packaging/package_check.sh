#!/usr/bin/env bash
# An install as a user makes it: `cmake --install` into a temporary prefix, moved elsewhere
# afterwards (relocatable), then a program outside the tree built against it with pkg-config
# (shared and static) and with CMake's find_package (kvf::kvf and kvf::kvf_static), run against
# the installed kvf-store; the library's SONAME and symbol versions; the tools where they belong.
#
#   package_check.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
BUILD=$1
SRC=$2
tmp=$(mktemp -d "${TMPDIR:-/tmp}/kvf-pkg.XXXXXX")
store_pid=
cleanup() {
    [ -n "$store_pid" ] && kill "$store_pid" 2>/dev/null && wait "$store_pid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "package_check: FAIL: $*" >&2; exit 1; }

cmake --install "$BUILD" --prefix "$tmp/staged" > "$tmp/install.log" 2>&1 ||
    { cat "$tmp/install.log" >&2; fail "cmake --install"; }
mv "$tmp/staged" "$tmp/moved"  # nothing may remember where it was installed
P=$tmp/moved
pc=$(find "$P" -name kvf.pc | head -1)
[ -n "$pc" ] || fail "no kvf.pc installed"
libdir=$(cd "$(dirname "$pc")/.." && pwd)
grep -q "$tmp/staged" "$pc" && fail "kvf.pc names the install prefix"
for cfg in "$libdir"/cmake/kvf/*.cmake; do
    grep -q "$tmp/staged" "$cfg" && fail "$(basename "$cfg") names the install prefix"
done

# the library: SONAME, versioned public symbols, nothing internal exported
so=$(readlink -f "$libdir/libkvf.so")
[ "$(readelf -d "$so" | sed -n 's/.*Library soname: \[\(.*\)\]/\1/p')" = libkvf.so.0 ] ||
    fail "SONAME is not libkvf.so.0"
syms=$(readelf --dyn-syms -W "$so" | awk '$7 != "UND" && $5 != "LOCAL" {print $8}' | grep '^kvf')
[ -n "$syms" ] || fail "no kvf_ symbol exported"
echo "$syms" | grep -v '@@KVF_0$' | grep -q . && fail "unversioned or internal symbols: $(echo "$syms" | grep -v '@@KVF_0$' | head -3 | tr '\n' ' ')"
echo "$syms" | grep -q '^kvf__' && fail "internal kvf__ symbols exported"

# tools: the daemons and kvf in bin/, the mlx-lm probe (a script for another host) under share/
for b in kvf kvf-store kvf-sched kvf-engine kvf-relay kvf-bench; do
    [ -x "$P/bin/$b" ] || fail "bin/$b not installed"
done
[ -e "$P/bin/kvf-mlx-probe" ] && fail "the mlx-lm probe is a script for another host, not a command of this one"
[ -f "$P/share/kvfabric/mlx_probe.py" ] || fail "share/kvfabric/mlx_probe.py not installed"
[ -f "$P/share/doc/kvfabric/LICENSE" ] || fail "LICENSE not installed"
for u in kvf-store@.service kvf-sched.service kvf-engine@.service kvf-relay@.service; do
    [ -f "$P/lib/systemd/system/$u" ] || fail "lib/systemd/system/$u not installed"
done

# the installed kvf.pc first; the path given keeps finding its dependencies' (a host whose
# libraries are unpacked outside the system's places names them there)
export PKG_CONFIG_PATH=$(dirname "$pc")${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
cc=${CC:-cc}
# pkg-config, shared
$cc -std=c11 -Wall -Werror -o "$tmp/ext_pc" "$SRC/tests/packaging/external.c" \
    $(pkg-config --cflags --libs kvf) -Wl,-rpath,"$libdir" || fail "build with pkg-config"
# pkg-config, static libkvf with its dependencies shared: every library libkvf.a needs comes
# from kvf.pc's private fields (Requires.private, Libs.private). (`pkg-config --static` would ask
# for the dependencies' own static closures, which Debian's libzmq.pc gets wrong.)
deps=$(pkg-config --print-requires-private kvf | awk '{print $1}' | tr '\n' ' ')
[ -n "$deps" ] || fail "kvf.pc has no Requires.private"
private=$(sed -n 's/^Libs.private: //p' "$pc")
$cc -std=c11 -Wall -Werror -o "$tmp/ext_static" "$SRC/tests/packaging/external.c" \
    $(pkg-config --cflags kvf) -L"$libdir" -Wl,-Bstatic -lkvf -Wl,-Bdynamic \
    $(pkg-config --libs $deps) $private || fail "static build with kvf.pc's private fields"
ldd "$tmp/ext_static" | grep -q libkvf && fail "the static build links libkvf.so"

# CMake
mkdir -p "$tmp/cm"
cp "$SRC/tests/packaging/external.c" "$tmp/cm/"
cat > "$tmp/cm/CMakeLists.txt" <<'CM'
cmake_minimum_required(VERSION 3.16)
project(kvf_external C)
find_package(kvf 0.1 CONFIG REQUIRED)
add_executable(ext external.c)
target_link_libraries(ext PRIVATE kvf::kvf)
if(NOT TARGET kvf::kvf_static)
  message(FATAL_ERROR "kvf::kvf_static is not defined")
endif()
add_executable(ext_static external.c)
target_link_libraries(ext_static PRIVATE kvf::kvf_static)
CM
cmake -S "$tmp/cm" -B "$tmp/cm/build" -DCMAKE_PREFIX_PATH="$P" > "$tmp/cm.log" 2>&1 ||
    { cat "$tmp/cm.log" >&2; fail "find_package(kvf)"; }
cmake --build "$tmp/cm/build" > "$tmp/cmb.log" 2>&1 || { cat "$tmp/cmb.log" >&2; fail "build with CMake"; }

# run all four against the installed store
"$P/bin/kvf-store" --listen 127.0.0.1:0 --memory 64M --no-prefault --log-level warn --shm off \
    > "$tmp/store.out" 2> "$tmp/store.err" &
store_pid=$!
addr=
for _ in $(seq 100); do
    addr=$(sed -n 's/.*listen=\([^ ]*\).*/\1/p' "$tmp/store.out")
    [ -n "$addr" ] && break
    sleep 0.05
done
[ -n "$addr" ] || { cat "$tmp/store.err" >&2; fail "the installed kvf-store did not start"; }
for p in "$tmp/ext_pc" "$tmp/ext_static" "$tmp/cm/build/ext" "$tmp/cm/build/ext_static"; do
    timeout 30 "$p" "$addr" || fail "$(basename "$p") against the installed store"
done
echo "package_check: ok (install moved to another prefix; pkg-config and CMake, shared and static)"
