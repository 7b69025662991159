"""Topics every daemon reads in full: CRDS context announcements and association declarations.

The arrivals are split between the daemons of a consumer group; these two are not: each daemon
has its own CRDS cache and ledger and must hear of every context change, and every daemon must
know which association each exposure belongs to (to report member completions to the owner).
So this is a plain consumer without a group, assigned every partition of both topics:

* contexts: at start the newest announcement (last message of each partition, newest timestamp
  wins) is applied once, then every new one in order — "the operational context is now X";
* association events: read from the beginning; ``on_caught_up()`` runs once the reader reached the
  end offsets it saw at start, then every new event is passed on live.

Nothing is committed (there is no group). Broker outages: degraded health, back-off, and a fresh
consumer (re-reading from the start) once the broker answers again.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import structlog

from .kafka_health import Backoff, BrokerHealth, HealthReporter
from .kafka_messages import MessageError, origin_of, parse_context
from .kafka_settings import KafkaSettings, ensure_topics

log = structlog.get_logger("calstream.daemon.kafka_broadcast")


class BroadcastReader:
    """A :class:`~calstream.daemon.sources.Source` (it submits nothing) reading contexts and
    association events on every daemon."""

    name = "kafka-broadcast"

    def __init__(self, settings: KafkaSettings, *, on_context: Callable[[str, str], None],
                 on_association_event: Callable[[bytes | None, str], None] | None = None,
                 on_caught_up: Callable[[], None] | None = None,
                 on_malformed: Callable[[str, str], None] | None = None, health: HealthReporter | None = None,
                 consumer_factory: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        self.on_context = on_context
        self.on_association_event = on_association_event
        self.on_caught_up = on_caught_up
        self.on_malformed = on_malformed
        self.health = BrokerHealth("kafka broadcast reader", health)
        self._factory = consumer_factory or self._new_consumer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Any = None
        self._catch_up: dict[Any, int] | None = None     # association partition -> end offset at start
        self.contexts_seen: list[str] = []
        self._applied: tuple[Any, ...] | None = None       # the announcement last applied (see _connect)

    @property
    def topics(self) -> list[str]:
        topics = [self.settings.topics.contexts]
        if self.on_association_event is not None:
            topics.append(self.settings.topics.associations)
        return topics

    def start(self, submit: Any = None) -> None:
        self._thread = threading.Thread(target=self._run, name="kafka broadcast", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # -- loop ---------------------------------------------------------------------------------------

    def _new_consumer(self) -> Any:
        from kafka import KafkaConsumer  # noqa: PLC0415

        return KafkaConsumer(**self.settings.consumer_options(group=False))

    def _run(self) -> None:
        backoff = Backoff(0.2, self.settings.retry_backoff_max_s)
        next_probe = 0.0
        while not self._stop.is_set():
            try:
                if self._consumer is None:
                    self._connect()
                    next_probe = time.monotonic() + self.settings.probe_interval_s
                records = self._consumer.poll(timeout_ms=self.settings.poll_timeout_ms)
                for partition, batch in records.items():
                    for record in batch:
                        self._dispatch(record)
                self._check_caught_up()
                if time.monotonic() >= next_probe:
                    self._probe()
                    next_probe = time.monotonic() + self.settings.probe_interval_s
                self.health.up()
                backoff.reset()
            except Exception as exc:  # noqa: BLE001 - broker trouble: back off, reconnect
                self.health.down(f"{type(exc).__name__}: {exc}")
                self._close()
                self._stop.wait(backoff.next_delay())
        self._close()

    def _connect(self) -> None:
        from kafka import TopicPartition  # noqa: PLC0415

        if self.settings.create_topics:
            ensure_topics(self.settings, tuple(self.topics))
        consumer = self._factory()
        try:
            partitions = []
            for topic in self.topics:
                ids = consumer.partitions_for_topic(topic)
                if not ids:
                    raise RuntimeError(f"topic {topic} does not exist (yet)")
                partitions += [TopicPartition(topic, p) for p in sorted(ids)]
            contexts = [tp for tp in partitions if tp.topic == self.settings.topics.contexts]
            associations = [tp for tp in partitions if tp.topic != self.settings.topics.contexts]
            newest, context_ends = self._newest_context(contexts)
            consumer.assign(partitions)
            for tp in contexts:
                consumer.seek(tp, context_ends[tp])
            if associations:
                consumer.seek_to_beginning(*associations)
            ends = consumer.end_offsets(associations) if associations else {}
        except Exception:
            consumer.close(autocommit=False)
            raise
        self._catch_up = {tp: end for tp, end in ends.items() if end > 0}
        self._consumer = consumer
        self._partitions = set(partitions)
        log.info("broadcast reader assigned", partitions=len(partitions), catching_up=sum(self._catch_up.values()))
        if newest is not None and _identity(newest) != self._applied:
            self._context(newest)         # not what this reader applied before a reconnect
        self._check_caught_up()

    def _newest_context(self, contexts: list) -> tuple[Any, dict]:
        """(the newest record over the contexts partitions or None, their end offsets), read by a
        consumer of its own (the main one never seeks after fetching)."""
        consumer = self._factory()
        try:
            consumer.assign(contexts)
            ends = consumer.end_offsets(contexts)
            for tp in contexts:
                consumer.seek(tp, max(0, ends[tp] - 1))
            last: dict[Any, Any] = {}
            deadline = time.monotonic() + self.settings.request_timeout_ms / 1000
            while any(consumer.position(tp) < ends[tp] for tp in contexts):
                if time.monotonic() > deadline:
                    raise TimeoutError("could not read the newest CRDS context announcement")
                for tp, batch in consumer.poll(timeout_ms=self.settings.poll_timeout_ms).items():
                    last[tp] = batch[-1]
        finally:
            consumer.close(autocommit=False)
        newest = max(last.values(), key=lambda r: (r.timestamp, r.partition), default=None)
        return newest, ends

    def _check_caught_up(self) -> None:
        if self._catch_up is None or self._consumer is None:
            return
        if all(self._consumer.position(tp) >= end for tp, end in self._catch_up.items()):
            self._catch_up = None
            log.info("association events caught up")
            if self.on_caught_up is not None:
                self.on_caught_up()

    def _probe(self) -> None:
        existing = self._consumer.topics()
        missing = [t for t in self.topics if t not in existing]
        if missing:
            raise RuntimeError(f"topics {missing} do not exist on the broker (restarted empty?)")
        for topic in self.topics:
            if len(self._consumer.partitions_for_topic(topic) or ()) != sum(
                    1 for tp in self._partitions if tp.topic == topic):
                raise RuntimeError(f"the partitions of {topic} changed: re-reading")

    def _close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.close(autocommit=False, timeout_ms=2000)
            except Exception:  # noqa: BLE001
                log.debug("closing the broadcast consumer failed", exc_info=True)

    # -- records ------------------------------------------------------------------------------------

    def _dispatch(self, record: Any) -> None:
        origin = origin_of(record)
        if record.topic == self.settings.topics.contexts:
            self._context(record)
        elif self.on_association_event is not None:
            self.on_association_event(record.value, origin)

    def _context(self, record: Any) -> None:
        origin = origin_of(record)
        try:
            context = parse_context(record.value)
        except MessageError as exc:
            log.warning("unusable CRDS context announcement ignored", origin=origin, reason=str(exc))
            if self.on_malformed is not None:
                self.on_malformed(origin, str(exc))
            return
        self._applied = _identity(record)
        self.contexts_seen.append(context)
        log.info("CRDS context announced", context=context, origin=origin)
        self.on_context(context, origin)


def _identity(record: Any) -> tuple[Any, ...]:
    """What tells one announcement from another, also across a broker that came back empty."""
    return record.topic, record.partition, record.offset, record.timestamp


__all__ = ["BroadcastReader"]
