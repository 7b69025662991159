"""Where events about products and errors go: the :class:`Sink` protocol and :class:`LogSink`.

Events are plain dicts (JSON-serialisable) published from the daemon's main thread once the
product and its ledger row are durable:

* ``{"type": "product", "path", "product_type", "exposure", "association", "stage",
  "crds_context", "cal_ver", "checksum"}`` — one per product file;
* ``{"type": "error", "path", "reason", "error_class", "stage"}`` — a quarantined input or a
  job that failed for good.

A sink that raises is logged and the daemon goes on (a sink never blocks processing).
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import structlog

PRODUCT_FIELDS = ("path", "product_type", "exposure", "association", "stage", "crds_context", "cal_ver",
                  "checksum")
ERROR_FIELDS = ("path", "reason", "error_class", "stage")


@runtime_checkable
class Sink(Protocol):
    def publish(self, event: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def product_event(**fields: Any) -> dict[str, Any]:
    """A product event with every field present (missing ones None)."""
    return {"type": "product", **{k: fields.get(k) for k in PRODUCT_FIELDS}}


def error_event(**fields: Any) -> dict[str, Any]:
    """An error event with every field present (missing ones None)."""
    return {"type": "error", **{k: fields.get(k) for k in ERROR_FIELDS}}


class LogSink:
    """Publishes each event as one structured log line (logger ``calstream.events``)."""

    def __init__(self, logger_name: str = "calstream.events") -> None:
        self._log = structlog.get_logger(logger_name)

    def publish(self, event: Mapping[str, Any]) -> None:
        fields = {k: v for k, v in event.items() if k != "type"}
        if event.get("type") == "error":
            self._log.warning("error event", **fields)
        else:
            self._log.info(f"{event.get('type', 'event')} event", **fields)

    def close(self) -> None:
        return None


class MemorySink:
    """Keeps events in a list (tests, the demo's progress display)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def publish(self, event: Mapping[str, Any]) -> None:
        self.events.append(dict(event))

    def close(self) -> None:
        return None


__all__ = ["ERROR_FIELDS", "LogSink", "MemorySink", "PRODUCT_FIELDS", "Sink", "error_event", "product_event"]
