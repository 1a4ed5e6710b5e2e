"""Prometheus metrics through libkvf's registry (kvf/metrics.h): the same typed families, label
sets, kvf_build_info and process collector as kvfabric's daemons, and the same exposition writer,
so an engine in Python serves /metrics without printing metric text itself.

>>> reg = Registry("kvf_pyengine")
>>> reg.counter_add("requests_total", "Requests answered.", {"kind": "prefill", "result": "ok"})
>>> reg.observe_seconds("request_phase_seconds", "Phases.", 0.012, {"phase": "prefill"})
>>> text = reg.expose()
"""

from __future__ import annotations

import ctypes
from typing import Mapping, Optional, Tuple

from . import _lib
from .errors import check


def _labels(labels: Optional[Mapping[str, str]]) -> Tuple[Optional[bytes], object]:
    if not labels:
        return None, None
    names = ",".join(labels).encode()
    vals = (ctypes.c_char_p * len(labels))(*[str(v).encode() for v in labels.values()])
    return names, vals


class Registry:
    """One registry (family names prefixed with prefix + "_"). Families are made on first use;
    a name used again with another type or other label names raises KvfError (KVF_EINVAL)."""

    def __init__(self, prefix: str) -> None:
        self._h = _lib.lib().kvf_metrics_new(prefix.encode())
        if not self._h:
            raise ValueError(f"metrics prefix {prefix!r}: not a metric name")

    def _update(self, fn: str, name: str, help: str, value: float,
                labels: Optional[Mapping[str, str]]) -> None:
        n, v = _labels(labels)
        check(getattr(_lib.lib(), fn)(self._h, name.encode(), help.encode(), n, v,
                                      float(value)), f"metric {name}")

    def counter_add(self, name: str, help: str, labels: Optional[Mapping[str, str]] = None,
                    value: float = 1.0) -> None:
        self._update("kvf_metrics_counter_add", name, help, value, labels)

    def counter_set(self, name: str, help: str, value: float,
                    labels: Optional[Mapping[str, str]] = None) -> None:
        """A counter mirrored from a monotonic count kept elsewhere (its value replaced)."""
        self._update("kvf_metrics_counter_set", name, help, value, labels)

    def gauge_set(self, name: str, help: str, value: float,
                  labels: Optional[Mapping[str, str]] = None) -> None:
        self._update("kvf_metrics_gauge_set", name, help, value, labels)

    def observe_seconds(self, name: str, help: str, seconds: float,
                        labels: Optional[Mapping[str, str]] = None) -> None:
        """A histogram of seconds with kvfabric's latency buckets (50 us to 10 s)."""
        self._update("kvf_metrics_observe_seconds", name, help, seconds, labels)

    def expose(self) -> str:
        """The registry in Prometheus's text format (0.0.4)."""
        text, n = ctypes.c_void_p(), ctypes.c_size_t()
        check(_lib.lib().kvf_metrics_expose(self._h, ctypes.byref(text), ctypes.byref(n)),
              "metrics")
        try:
            return ctypes.string_at(text, n.value).decode()
        finally:
            _lib.lib().kvf_metrics_text_free(text)

    def close(self) -> None:
        if self._h:
            h = ctypes.c_void_p(self._h)
            _lib.lib().kvf_metrics_free(ctypes.byref(h))
            self._h = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
