#!/bin/sh
# A stand-in for nvidia-cuda-mps-control (no GPU in CI), for cluster_mps_check.py: "-d" starts a
# "daemon" (a shell loop) that holds the pipe directory's "control" until it is asked to quit;
# without arguments it reads commands from stdin, as the real one does ("quit"). Every call is
# logged in $CUDA_MPS_LOG_DIRECTORY/fake.log (or the pipe directory's, for an operator's daemon);
# "quit" logs how many processes still name the pipes in their environment (its clients: none
# should be left). FAKE_MPS_FAIL=1 makes "-d" fail as the real one does when it cannot start;
# FAKE_MPS_NOPIPE=1 makes it succeed without making pipes.
P=${CUDA_MPS_PIPE_DIRECTORY:?}
L=${CUDA_MPS_LOG_DIRECTORY:-$P}/fake.log
if [ "${1:-}" = "-d" ]; then
    echo "start pipe=$P" >> "$L"
    if [ "${FAKE_MPS_FAIL:-0}" = 1 ]; then
        echo "An instance of this daemon is already running"
        exit 1
    fi
    [ "${FAKE_MPS_NOPIPE:-0}" = 1 ] && exit 0
    mkfifo "$P/control" || exit 1
    # the daemon: at most 10 minutes, or until quit removes its pipe
    (i=0; while [ -p "$P/control" ] && [ $i -lt 6000 ]; do sleep 0.1; i=$((i+1)); done) \
        </dev/null >/dev/null 2>&1 &
    echo $! > "$P/daemon.pid"
    exit 0
fi
while read -r cmd; do
    if [ ! -p "$P/control" ]; then
        echo "cmd $cmd: no daemon" >> "$L"
        echo "Cannot find MPS control daemon process"
        exit 1
    fi
    clients=$(python3 - "$P" "$(cat "$P/daemon.pid")" "$$" <<'PY'
import os, sys
want = ("CUDA_MPS_PIPE_DIRECTORY=" + sys.argv[1]).encode()
mine = {os.getpid(), os.getppid(), int(sys.argv[2]), int(sys.argv[3])}
n = 0
for d in os.listdir("/proc"):
    try:
        with open("/proc/%s/stat" % d, "rb") as f:  # the daemon's own children are not clients
            ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        if int(d) in mine or ppid in mine:
            continue
        with open("/proc/%s/environ" % d, "rb") as f:
            n += want in f.read().split(b"\0")
    except (OSError, ValueError, IndexError):
        pass
print(n)
PY
)
    echo "cmd $cmd clients=$clients" >> "$L"
    if [ "$cmd" = quit ]; then
        kill "$(cat "$P/daemon.pid")" 2>/dev/null
        rm -f "$P/control" "$P/daemon.pid"
    fi
done
exit 0
