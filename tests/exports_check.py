#!/usr/bin/env python3
"""libkvf.so exports exactly the functions its installed headers declare.

usage: exports_check.py LIBKVF.so HEADER...

Every function an installed header declares with KVF_API must be a defined dynamic symbol of the
shared library (an engine that links against the header must find it), and every function the
library exports must be declared by one of those headers (nothing internal leaks out).
"""
import re
import subprocess
import sys


def declared(headers):
    names = set()
    for path in headers:
        text = open(path, encoding="utf-8").read()
        text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
        text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        for decl in re.findall(r"\bKVF_API\b([^;{]*?)\(", text):
            m = re.search(r"([A-Za-z_][A-Za-z0-9_]*)\s*$", decl)
            if m:
                names.add(m.group(1))
    return names


def exported(lib):
    out = subprocess.run(["nm", "-D", "--defined-only", lib], check=True, capture_output=True,
                         text=True).stdout
    # names carry their version (kvf_x@@KVF_0, cmake/libkvf.map): the name is before the "@"
    return {parts[2].split("@")[0] for parts in (line.split() for line in out.splitlines())
            if len(parts) == 3 and parts[1] in "TtWi"}


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    lib, headers = sys.argv[1], sys.argv[2:]
    want, have = declared(headers), exported(lib)
    missing = sorted(want - have)
    leaked = sorted(n for n in have - want if not n.startswith("_"))
    for n in missing:
        print(f"exports_check: declared with KVF_API but not exported: {n}")
    for n in leaked:
        print(f"exports_check: exported but declared by no installed header: {n}")
    if missing or leaked:
        return 1
    print(f"exports_check: OK: {len(want)} functions declared and exported by {len(headers)} headers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
