#!/usr/bin/env bash
# The systemd units verify: each template instantiated (kvf-store@test, kvf-engine@test,
# kvf-relay@test) with this build's binaries, checked by systemd-analyze verify, which must say
# nothing (a warning, an unknown key or a command that is not there fails the test).
#
#   units_check.sh SOURCE_DIR BIN_DIR
# Exit 77 (skipped) where systemd-analyze is not installed.
set -euo pipefail
SRC=$1
BIN=$(cd "$2" && pwd)
command -v systemd-analyze >/dev/null || { echo "units_check: SKIP: no systemd-analyze"; exit 77; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/kvf-units.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
for f in "$SRC"/cluster/systemd/*.service.in; do
    b=$(basename "$f" .in)
    sed "s|@KVF_UNIT_BINDIR@|$BIN|" "$f" > "$tmp/${b/@./@test.}"
done
n=$(ls "$tmp"/*.service | wc -l)
[ "$n" -eq 4 ] || { echo "units_check: FAIL: $n units, expected 4"; exit 1; }
grep -q "^Type=notify" "$tmp"/kvf-store@test.service || { echo "units_check: FAIL: Type=notify"; exit 1; }
out=$(systemd-analyze verify --man=no "$tmp"/*.service 2>&1) && rc=0 || rc=$?
if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
    echo "units_check: FAIL: systemd-analyze verify (rc $rc):"
    echo "$out"
    exit 1
fi
# the hardening every unit carries
for u in "$tmp"/*.service; do
    for k in User=kvfabric ProtectSystem=strict NoNewPrivileges=yes PrivateTmp=yes \
             "CapabilityBoundingSet=" WatchdogSec=; do
        grep -q "^$k" "$u" || { echo "units_check: FAIL: $(basename "$u") lacks $k"; exit 1; }
    done
done
echo "units_check: ok ($n units verify)"
