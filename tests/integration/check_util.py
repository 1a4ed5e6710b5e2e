"""What the integration checks share: failing with the check's name, running a command whose exit
status is checked, an HTTP request answered in JSON, and whether a process is alive."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request


def _name():
    return os.path.splitext(os.path.basename(sys.argv[0]))[0] or "check"


def fail(msg):
    """Print why the check fails, under its own name, and exit 1."""
    print("%s: FAIL: %s" % (_name(), msg))
    sys.exit(1)


def run(args, timeout, expect=0):
    """Run a command and capture its output; fail unless it exits with `expect` (None: any)."""
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if expect is not None and p.returncode != expect:
        fail("%s: exit %d (wanted %d)\nstdout: %s\nstderr: %s"
             % (" ".join(args), p.returncode, expect, p.stdout[-3000:], p.stderr[-3000:]))
    return p


def http(method, url, body=None, token=None, timeout=30):
    """(status, decoded JSON body). `body` is bytes as they are, or anything JSON encodes;
    `token`, where given, is sent as a bearer token."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def alive(pid):
    """Whether the process runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc here: kill(0) is all there is to go on
