"""Broker reachability as the Kafka source and sink see it: health reasons and retry back-off.

``/healthz`` says "degraded" (with a reason per component) while a component cannot reach the
broker, and "ok" again once it can; the component keeps its work meanwhile and retries with an
exponential back-off.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import structlog

log = structlog.get_logger("calstream.daemon.kafka")


class HealthReporter(Protocol):
    """What :class:`~calstream.daemon.metrics.Metrics` offers for health."""

    def set_degraded(self, reason: str) -> None: ...

    def clear_degraded(self, reason: str) -> None: ...


class BrokerHealth:
    """One component's view of the broker: ``down(detail)`` / ``up()``, reported on changes only."""

    def __init__(self, component: str, reporter: HealthReporter | None = None) -> None:
        self.component = component
        self.reason = f"{component}: Kafka broker unreachable"
        self._reporter = reporter
        self._lock = threading.Lock()
        self._down_since: float | None = None

    @property
    def is_down(self) -> bool:
        with self._lock:
            return self._down_since is not None

    def down(self, detail: str) -> None:
        """The broker could not be reached (``detail``: the error); degraded from now on."""
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
        if first:
            log.warning("Kafka broker unreachable: degraded, retrying", component=self.component, error=detail)
            if self._reporter is not None:
                self._reporter.set_degraded(self.reason)

    def up(self) -> None:
        """The broker answered again; clears the degraded reason."""
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            log.info("Kafka broker reachable again", component=self.component,
                     down_seconds=round(time.monotonic() - since, 1))
            if self._reporter is not None:
                self._reporter.clear_degraded(self.reason)


class Backoff:
    """Exponential back-off: ``first`` s, doubling up to ``maximum`` s; ``reset()`` after a success."""

    def __init__(self, first: float = 0.2, maximum: float = 10.0) -> None:
        self.first, self.maximum = first, maximum
        self._next = first

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self.maximum, self._next * 2)
        return delay

    def reset(self) -> None:
        self._next = self.first


__all__ = ["Backoff", "BrokerHealth", "HealthReporter"]
