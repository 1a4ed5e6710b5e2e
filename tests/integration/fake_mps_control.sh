#!/bin/sh
# A stand-in for nvidia-cuda-mps-control (no GPU in CI), for cluster_mps_check.py: "-d" starts a
# "daemon" (a shell loop) that holds the pipe directory's "control" until it is asked to quit;
# without arguments it reads commands from stdin, as the real one does ("quit"). Every call is
# logged in $CUDA_MPS_LOG_DIRECTORY/fake.log. FAKE_MPS_FAIL=1 makes "-d" fail as the real one
# does when it cannot start.
P=${CUDA_MPS_PIPE_DIRECTORY:?}
L=${CUDA_MPS_LOG_DIRECTORY:-$P}/fake.log
if [ "${1:-}" = "-d" ]; then
    if [ "${FAKE_MPS_FAIL:-0}" = 1 ]; then
        echo "An instance of this daemon is already running"
        exit 1
    fi
    mkfifo "$P/control" || exit 1
    # the daemon: at most 10 minutes, or until quit removes its pipe
    (i=0; while [ -p "$P/control" ] && [ $i -lt 6000 ]; do sleep 0.1; i=$((i+1)); done) \
        </dev/null >/dev/null 2>&1 &
    echo $! > "$P/daemon.pid"
    echo "start pipe=$P" >> "$L"
    exit 0
fi
[ -p "$P/control" ] || { echo "Cannot find MPS control daemon process"; exit 1; }
while read -r cmd; do
    echo "cmd $cmd" >> "$L"
    if [ "$cmd" = quit ]; then
        kill "$(cat "$P/daemon.pid")" 2>/dev/null
        rm -f "$P/control" "$P/daemon.pid"
    fi
done
exit 0
