"""Product and error events to Kafka: a :class:`~calstream.daemon.sinks.Sink` with a sender thread.

``publish`` only appends to a bounded in-memory buffer (it never blocks the daemon); one sender
thread sends the buffer in order with ``acks="all"`` and an idempotent producer, and removes an
event only once the broker acknowledged it. When the broker is away the events stay buffered, the
health endpoint says degraded, and the sender retries with back-off (re-creating the producer and,
if configured, the topics). After a failure everything from the first unacknowledged event on is
sent again in order, so each key's events stay ordered; an event may then arrive twice (at least
once; consumers de-duplicate on path + checksum). A full buffer drops its OLDEST event with an
error log (the ledger still has every product: ``calstream status``).

Keys: the exposure for stage 1/2 products and errors, the association for stage 3 products
(:func:`~calstream.daemon.kafka_messages.event_key`), so one subject's events stay in one partition.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import structlog

from .kafka_health import Backoff, BrokerHealth, HealthReporter
from .kafka_messages import encode_event, event_key
from .kafka_settings import KafkaSettings, ensure_topics

log = structlog.get_logger("calstream.daemon.kafka_sink")

#: events sent per round before waiting for the broker's acknowledgements
SEND_BATCH = 256


@dataclass(frozen=True)
class Outgoing:
    """One message waiting for the broker's acknowledgement."""

    topic: str
    key: bytes | None
    value: bytes
    on_delivered: Callable[[], None] | None = None


class KafkaSink:
    """Publishes product events to ``topics.products`` and error events to ``topics.errors``.

    ``send(topic, key, value)`` queues any other message (the association relay uses it) through
    the same ordered, retried buffer.
    """

    name = "kafka"

    def __init__(self, settings: KafkaSettings, *, health: HealthReporter | None = None,
                 registry: Any = None, producer_factory: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        self.health = BrokerHealth("kafka sink", health)
        self._factory = producer_factory or self._new_producer
        self._buffer: deque[Outgoing] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._producer: Any = None
        self._in_flight = 0            # messages at the buffer's head being sent (never dropped)
        self.sent = 0
        self.dropped = 0
        self._metrics = _SinkMetrics(registry) if registry is not None else None
        self._thread = threading.Thread(target=self._run, name="kafka sink", daemon=True)
        self._thread.start()

    # -- Sink protocol ----------------------------------------------------------------------------

    def publish(self, event: Mapping[str, Any]) -> None:
        """Queue a product or error event (other types are ignored with a log line)."""
        kind = event.get("type")
        topic = {"product": self.settings.topics.products, "error": self.settings.topics.errors}.get(kind)
        if topic is None:
            log.debug("event type not published to Kafka", type=kind)
            return
        self.send(topic, event_key(event), encode_event(event))

    def send(self, topic: str, key: str | None, value: bytes,
             on_delivered: Callable[[], None] | None = None) -> None:
        """Queue one message; never blocks. ``on_delivered()`` runs (on the sender thread) once the
        broker acknowledged it. A full buffer drops its oldest product or error event (the ledger
        keeps what they report); association messages, which other daemons act on, are kept."""
        item = Outgoing(topic, None if key is None else key.encode("utf-8"), value, on_delivered)
        with self._cond:
            if len(self._buffer) >= self.settings.max_buffered_events:
                self._drop_oldest_report()
            self._buffer.append(item)
            self._cond.notify()

    def _drop_oldest_report(self) -> None:
        """(lock held) Remove the oldest product/error event not being sent, if any is buffered."""
        reports = (self.settings.topics.products, self.settings.topics.errors)
        for i, queued in enumerate(self._buffer):
            if i >= self._in_flight and queued.topic in reports and queued.on_delivered is None:
                del self._buffer[i]
                self.dropped += 1
                log.error("Kafka sink buffer full: oldest event dropped (the ledger keeps the product)",
                          topic=queued.topic, key=queued.key, buffered=len(self._buffer))
                if self._metrics:
                    self._metrics.dropped.inc()
                return

    def pending(self) -> int:
        """Messages not yet acknowledged by the broker."""
        with self._cond:
            return len(self._buffer)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued message is acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Send what can be sent within ``timeout`` s, then stop (what is left is logged)."""
        self.flush(timeout)
        with self._cond:
            self._stop = True
            left = len(self._buffer)
            self._cond.notify_all()
        self._thread.join(timeout=timeout)
        if left:
            log.error("Kafka sink closed with unsent events (the ledger has the products)", unsent=left)
        self._close_producer()

    # -- sender thread ----------------------------------------------------------------------------

    def _new_producer(self) -> Any:
        from kafka import KafkaProducer  # noqa: PLC0415

        return KafkaProducer(**self.settings.producer_options())

    def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=1)
            except Exception:  # noqa: BLE001 - closing a broken producer may fail any way
                log.debug("closing the Kafka producer failed", exc_info=True)

    def _run(self) -> None:
        backoff = Backoff(0.2, self.settings.retry_backoff_max_s)
        while True:
            with self._cond:
                while not self._buffer and not self._stop:
                    self._cond.wait(0.5)
                if self._stop:
                    return
                batch = [self._buffer[i] for i in range(min(SEND_BATCH, len(self._buffer)))]
                self._in_flight = len(batch)
            try:
                delivered = self._send_batch(batch)
                error = None if delivered == len(batch) else "not acknowledged in time"
            except Exception as exc:  # noqa: BLE001 - any client error: keep the events, retry
                delivered, error = 0, f"{type(exc).__name__}: {exc}"
            self._remove_delivered(delivered)
            if error is None:
                self.health.up()
                backoff.reset()
                continue
            self.health.down(error)
            self._close_producer()
            self._wait(backoff.next_delay())
            self._recreate_topics()

    def _send_batch(self, batch: list[Outgoing]) -> int:
        """Send ``batch`` in order; the number of leading messages the broker acknowledged."""
        if self._producer is None:
            self._producer = self._factory()
        futures = [self._producer.send(m.topic, key=m.key, value=m.value) for m in batch]
        self._producer.flush(timeout=self.settings.producer_options()["delivery_timeout_ms"] / 1000 + 1)
        delivered = 0
        for future in futures:
            if not future.is_done or future.failed():
                if future.is_done:
                    log.warning("Kafka send failed", error=str(future.exception))
                break
            delivered += 1
        return delivered

    def _remove_delivered(self, count: int) -> None:
        with self._cond:
            delivered = [self._buffer.popleft() for _ in range(count)]
            self._in_flight = 0
            self.sent += count
            if self._metrics:
                self._metrics.buffered.set(len(self._buffer))
            self._cond.notify_all()
        for item in delivered:
            if self._metrics:
                self._metrics.published.labels(item.topic).inc()
            if item.on_delivered is not None:
                try:
                    item.on_delivered()
                except Exception:  # noqa: BLE001 - a callback must not stop the sender
                    log.exception("delivery callback failed", topic=item.topic)

    def _wait(self, seconds: float) -> None:
        with self._cond:
            if not self._stop:
                self._cond.wait(seconds)

    def _recreate_topics(self) -> None:
        if not self.settings.create_topics:
            return
        try:
            created = ensure_topics(self.settings, (self.settings.topics.products, self.settings.topics.errors,
                                                    self.settings.topics.associations))
            if created:
                log.warning("Kafka topics were missing and have been created", topics=created)
        except Exception as exc:  # noqa: BLE001 - the broker is still away: next round
            log.debug("cannot check the Kafka topics yet", error=str(exc))


class _SinkMetrics:
    """Prometheus series of the sink, on the daemon's registry."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge  # noqa: PLC0415

        self.published = Counter("calstream_kafka_published", "Events acknowledged by the Kafka broker",
                                 ["topic"], registry=registry)
        self.buffered = Gauge("calstream_kafka_buffered", "Events waiting for the Kafka broker", registry=registry)
        self.dropped = Counter("calstream_kafka_dropped", "Events dropped from a full Kafka sink buffer",
                               registry=registry)


__all__ = ["KafkaSink", "Outgoing", "encode_event"]
