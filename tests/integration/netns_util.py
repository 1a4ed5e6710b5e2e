"""What the integration checks that run in network namespaces share."""

import os
import shutil
import subprocess


def netns_possible():
    """None where network namespaces can be made here, else why not."""
    if not shutil.which("ip"):
        return "no ip command (iproute2) on this host"
    probe = "kvf-probe-%d" % os.getpid()
    p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if p.returncode != 0:
        return p.stderr.strip() or "ip netns add failed"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None
