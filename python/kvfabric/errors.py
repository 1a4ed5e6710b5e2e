"""Errors: every failure of libkvf is a KvfError carrying the KVF_E* code and its name."""

from __future__ import annotations

from . import _lib


class KvfError(Exception):
    """A libkvf call failed.

    code is the (negative) KVF_E* code, name its symbolic name ("KVF_ECONNREFUSED"), and the
    message says what failed and, where libkvf gave one, why.
    """

    def __init__(self, code: int, what: str, detail: str = "") -> None:
        self.code = int(code)
        self.name = error_name(self.code)
        text = f"{what}: {self.name} ({error_text(self.code)})"
        if detail:
            text += f": {detail}"
        super().__init__(text)


class Miss(KvfError):
    """A layer of a load did not arrive (evicted, store down, deadline, checksum, a failed copy):
    the engine recomputes it. Raised by Transfer.wait_layer and Transfer.wait."""


def error_name(code: int) -> str:
    """The symbolic name of a KVF_E* code, e.g. "KVF_ECHECKSUM" ("KVF_OK" for 0)."""
    return _lib.lib().kvf_err_name(int(code)).decode()


def error_text(code: int) -> str:
    """The one-line description of a KVF_E* code."""
    return _lib.lib().kvf_strerror(int(code)).decode()


def check(rc: int, what: str, detail: str = "") -> None:
    """Raises KvfError for a non-zero rc."""
    if rc:
        raise KvfError(rc, what, detail)
