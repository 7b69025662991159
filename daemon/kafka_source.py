"""Exposure arrivals from Kafka: one consumer-group member per daemon, jobs off the poll loop.

Every daemon of a deployment joins the same consumer group on the arrivals topic (and on the
association-events topic, see :mod:`calstream.daemon.kafka_associations`); Kafka splits the
partitions between them.

* The poll loop (one thread) never waits for work: it parses a message, hands an
  :class:`~calstream.daemon.sources.Arrival` to the daemon with an ``ack`` and polls on. Acks come
  back (from the daemon's thread) through a queue; the loop commits, per partition, everything below
  the oldest unfinished offset (:class:`~calstream.daemon.kafka_offsets.OffsetTracker`) — only after
  the daemon recorded the input's terminal state, so at least once, never lost.
* Back-pressure: arrivals wait in a small local backlog (what one fetch returned) and are handed
  on while ``has_capacity()`` holds and fewer than ``max_in_flight`` are unfinished; a partition
  with a backlog, or all of them when there is no room, is paused. Every poll drains what the
  client has parsed (kafka-python 3.0 never fetches again a partition paused with parsed records
  left over, and a seek back after a cut-short batch has the same effect), so no seek is used.
* A message that cannot be used (not JSON, no path, a relative path, a missing file, ...) becomes an
  error event on the errors topic and is committed: it never blocks its partition.
* Rebalance: revoked partitions commit what is finished (asynchronously: kafka-python runs listeners
  on its IO thread) and are forgotten; their unfinished messages go to the new owner. A message
  redelivered while this daemon still works on the same file is not submitted twice: its offset is
  finished together with the running one.
* Stop (SIGTERM): the partitions are paused; finished work keeps being committed until no arrival
  is in flight any more, then the consumer leaves the group (``stop()`` itself never waits for
  the daemon's acks, which come from the thread that calls it).
* Broker outage: a probe (metadata request every ``probe_interval_s``) notices it, the health
  endpoint says degraded, the daemon keeps its work; when the broker answers again the consumer is
  re-created (missing topics re-created if ``create_topics``) and rejoins the group.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import structlog
from kafka import ConsumerRebalanceListener
from kafka.errors import CommitFailedError, IllegalGenerationError, RebalanceInProgressError, UnknownMemberIdError
from kafka.structs import OffsetAndMetadata

from .kafka_health import Backoff, BrokerHealth, HealthReporter
from .kafka_messages import ArrivalMessage, MessageError, origin_of, parse_arrival
from .kafka_offsets import OffsetTracker, Ticket
from .kafka_settings import KafkaSettings, ensure_topics
from .sinks import error_event
from .sources import Arrival

log = structlog.get_logger("calstream.daemon.kafka_source")

Submit = Callable[[Arrival], None]
Done = Callable[[], None]

#: max_records of every poll: all the client has parsed (see the module docstring)
POLL_EVERYTHING = 1 << 20


class AssociationRouting(Protocol):
    """How the source hands association traffic to :mod:`calstream.daemon.kafka_associations`."""

    def declare(self, message: ArrivalMessage, origin: str, done: Done, submit: Submit) -> None:
        """An asn file arrived: publish its declaration; call ``done()`` once the broker has it."""

    def handle(self, value: bytes | None, origin: str, submit: Submit, done: Done) -> None:
        """A message of the association-events topic this daemon's group member received."""

    def assignment_changed(self, partitions: set[int]) -> None:
        """The association-events partitions assigned to this member now (poll thread)."""

    def revoked(self) -> None:
        """A rebalance started (IO thread): nothing is owned until the next assignment."""


class KafkaSource:
    """A :class:`~calstream.daemon.sources.Source` reading the arrivals topic as a group member."""

    name = "kafka"

    def __init__(self, settings: KafkaSettings, *, has_capacity: Callable[[], bool],
                 publish_error: Callable[[Mapping[str, Any]], None], max_in_flight: int = 4,
                 routing: AssociationRouting | None = None, health: HealthReporter | None = None,
                 consumer_factory: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        self.has_capacity = has_capacity
        self.publish_error = publish_error
        self.max_in_flight = max(1, max_in_flight)
        self.routing = routing
        self.health = BrokerHealth("kafka source", health)
        self._factory = consumer_factory or self._new_consumer
        self.tracker = OffsetTracker()
        self._acks: queue.SimpleQueue[Ticket] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._by_path: dict[Path, list[Ticket]] = {}      # files in flight -> their tickets
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._thread: threading.Thread | None = None
        self._submit: Submit | None = None
        self._consumer: Any = None
        self._owned_reported: set[int] | None = None    # association partitions last told to routing
        self._owned_assigned: set[int] | None = None    # ... as the last assignment callback gave them
        self._backlog: dict[Any, deque] = {}             # arrival partition -> fetched, not handed on
        self.counts = {"submitted": 0, "malformed": 0, "committed": 0, "joined": 0}

    @property
    def topics(self) -> list[str]:
        topics = [self.settings.topics.arrivals]
        if self.routing is not None:
            topics.append(self.settings.topics.associations)
        return topics

    # -- Source protocol --------------------------------------------------------------------------

    def start(self, submit: Submit) -> None:
        self._submit = submit
        self._thread = threading.Thread(target=self._run, name="kafka source", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop taking messages. With no arrival in flight the consumer commits and leaves the group
        now; otherwise it stays (paused) and leaves once the daemon acked the last one."""
        self._draining.set()
        if self._thread is not None and self._arrivals_in_flight() == 0:
            self._thread.join(timeout=10)

    def kill(self) -> None:
        """Leave now, whatever is in flight (tests; a daemon past its grace period)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- poll loop --------------------------------------------------------------------------------

    def _new_consumer(self) -> Any:
        from kafka import KafkaConsumer  # noqa: PLC0415

        return KafkaConsumer(**self.settings.consumer_options())

    def _connect(self) -> None:
        if self.settings.create_topics:
            created = ensure_topics(self.settings, tuple(self.topics))
            if created:
                log.warning("Kafka topics were missing and have been created", topics=created)
        consumer = self._factory()
        consumer.subscribe(self.topics, listener=_Rebalance(self, consumer))
        self._consumer = consumer
        self.counts["joined"] += 1
        log.info("Kafka consumer subscribed", topics=self.topics, group=self.settings.group_id)

    def _disconnect(self, *, commit: bool) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        if commit:
            self._drain_acks()
            self._commit(consumer)
        try:
            consumer.close(autocommit=False, timeout_ms=2000)
        except Exception:  # noqa: BLE001 - a consumer of a dead broker may fail to close
            log.debug("closing the Kafka consumer failed", exc_info=True)
        self.tracker.drop(self.tracker.partitions())
        self._drop_backlog(list(self._backlog))
        self._revoke_ownership()

    def _run(self) -> None:
        backoff = Backoff(0.2, self.settings.retry_backoff_max_s)
        next_probe = 0.0
        while not self._stop.is_set():
            if self._draining.is_set() and self._drained():
                break
            try:
                if self._consumer is None:
                    self._connect()
                    next_probe = time.monotonic() + self.settings.probe_interval_s
                self._drain_acks()
                self._commit(self._consumer)
                self._flow_control(self._consumer)
                records = self._consumer.poll(timeout_ms=self.settings.poll_timeout_ms,
                                              max_records=POLL_EVERYTHING)
                self._report_ownership(self._consumer)
                if records:
                    self._handle(self._consumer, records)
                self._feed()
                if time.monotonic() >= next_probe:
                    self._probe(self._consumer)
                    next_probe = time.monotonic() + self.settings.probe_interval_s
                self.health.up()
                backoff.reset()
            except Exception as exc:  # noqa: BLE001 - broker trouble: keep the work, retry
                self.health.down(f"{type(exc).__name__}: {exc}")
                self._disconnect(commit=False)
                self._stop.wait(backoff.next_delay())
        self._disconnect(commit=True)

    def _report_ownership(self, consumer: Any) -> None:
        """Tell the router which association partitions are ours after each (re)assignment."""
        if self.routing is None:
            return
        with self._lock:
            owned = self._owned_assigned         # None between a revocation and the next assignment
        if owned is not None and owned != self._owned_reported:
            self._owned_reported = owned
            self.routing.assignment_changed(owned)

    def _probe(self, consumer: Any) -> None:
        """A metadata round trip; raises when the broker is away or our topics vanished."""
        existing = consumer.topics()
        self.health.up()
        missing = [t for t in self.topics if t not in existing]
        if missing:
            raise RuntimeError(f"topics {missing} do not exist on the broker (restarted empty?)")

    # -- messages ---------------------------------------------------------------------------------

    def _handle(self, consumer: Any, records: Mapping[Any, list]) -> None:
        """Association events are handled at once; arrivals join the backlog."""
        if self._draining.is_set():
            return        # stopping: not begun, so not committed; the group's next owner gets them
        with self._lock:
            for partition, batch in records.items():
                if partition.topic == self.settings.topics.arrivals:
                    self._backlog.setdefault(partition, deque()).extend(batch)
        for partition, batch in records.items():
            if partition.topic != self.settings.topics.arrivals:
                for record in batch:
                    self._dispatch(partition, record)

    def _feed(self) -> None:
        """Hand backlog arrivals to the daemon while there is room, one partition after another
        (round robin, one record at a time, so ``max_in_flight`` holds)."""
        turn = 0
        while self._room():
            with self._lock:
                partitions = [tp for tp, queued in self._backlog.items() if queued]
                if not partitions:
                    return
                partition = partitions[turn % len(partitions)]
                record = self._backlog[partition].popleft()
            turn += 1
            self._dispatch(partition, record)

    def _drop_backlog(self, partitions: Any) -> None:
        with self._lock:
            for partition in list(partitions):
                self._backlog.pop(partition, None)

    def _revoke_ownership(self) -> None:
        if self.routing is not None:
            with self._lock:
                self._owned_assigned = None
            self._owned_reported = None
            self.routing.revoked()

    def _assigned(self, partitions: Any) -> None:
        """Assignment callback (IO thread): the association partitions owned from now on."""
        with self._lock:
            self._owned_assigned = {tp.partition for tp in partitions
                                    if tp.topic == self.settings.topics.associations}

    def _room(self) -> bool:
        if self._draining.is_set():
            return False
        return self._arrivals_in_flight() < self.max_in_flight and self.has_capacity()

    def _arrivals_in_flight(self) -> int:
        """Unfinished messages of the arrivals topic (association events wait for stage 3: not counted)."""
        return self.tracker.in_flight(lambda tp: tp.topic == self.settings.topics.arrivals)

    def _drained(self) -> bool:
        self._drain_acks()
        return self._arrivals_in_flight() == 0

    def _dispatch(self, partition: Any, record: Any) -> None:
        origin = origin_of(record)
        if partition.topic != self.settings.topics.arrivals:
            assert self.routing is not None
            ticket = self.tracker.begin(partition, record.offset)
            try:
                self.routing.handle(record.value, origin, self._submit_arrival, lambda: self._acks.put(ticket))
            except Exception as exc:  # noqa: BLE001 - a bad event must never block its partition
                log.exception("association event not usable", origin=origin)
                self._acks.put(ticket)
                self.publish_error(error_event(path=origin, reason=f"{type(exc).__name__}: {exc}",
                                               error_class="MalformedMessage", stage="associations"))
            return
        try:
            message = parse_arrival(record.value)
            if not message.path.is_file():
                raise MessageError(f"no such file on the shared storage: {message.path}")
        except (MessageError, OSError) as exc:
            self._malformed(partition, record, str(exc))
            return
        ticket = self.tracker.begin(partition, record.offset)
        if message.kind == "asn" and self.routing is not None:
            self.routing.declare(message, origin, lambda: self._acks.put(ticket), self._submit_arrival)
            return
        self._submit_with_ticket(Arrival(path=message.path, kind=message.kind, origin=origin,
                                         size=message.size, checksum=message.checksum), ticket)

    def _submit_arrival(self, arrival: Arrival) -> None:
        """Submit for the association router (its ack already finishes the router's ticket)."""
        assert self._submit is not None
        self.counts["submitted"] += 1
        self._submit(arrival)

    def _submit_with_ticket(self, arrival: Arrival, ticket: Ticket) -> None:
        """Hand ``arrival`` to the daemon unless the same file is in flight here already: then its
        offset finishes together with the running one (a redelivery after a rebalance)."""
        with self._lock:
            tickets = self._by_path.get(arrival.path)
            running = tickets is not None
            self._by_path.setdefault(arrival.path, []).append(ticket)
        if running:
            log.info("redelivered while in flight: not submitted again", path=str(arrival.path),
                     origin=arrival.origin)
            return
        assert self._submit is not None
        self.counts["submitted"] += 1
        self._submit(Arrival(path=arrival.path, kind=arrival.kind, origin=arrival.origin, size=arrival.size,
                             checksum=arrival.checksum, ack=lambda outcome: self._ack_path(arrival.path, outcome)))

    def _ack_path(self, path: Path, outcome: str) -> None:
        """The daemon's ack (any thread): every ticket of ``path`` is finished."""
        with self._lock:
            tickets = self._by_path.pop(path, [])
        log.debug("arrival finished", path=str(path), outcome=outcome, messages=len(tickets))
        for ticket in tickets:
            self._acks.put(ticket)

    def _malformed(self, partition: Any, record: Any, reason: str) -> None:
        self.counts["malformed"] += 1
        origin = origin_of(record)
        log.warning("unusable Kafka message: error event, committed", origin=origin, reason=reason)
        self.publish_error(error_event(path=origin, reason=reason, error_class="MalformedMessage",
                                       stage="intake"))
        self.tracker.skip(partition, record.offset)

    # -- acks, commits, flow control ---------------------------------------------------------------

    def _drain_acks(self) -> None:
        while True:
            try:
                ticket = self._acks.get_nowait()
            except queue.Empty:
                return
            self.tracker.finish(ticket)

    def _commit(self, consumer: Any) -> None:
        offsets = self.tracker.to_commit(consumer.assignment())
        if not offsets:
            return
        try:
            consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()})
        except (CommitFailedError, RebalanceInProgressError, IllegalGenerationError, UnknownMemberIdError) as exc:
            log.info("commit deferred: the group is rebalancing", error=type(exc).__name__)
            return
        self.tracker.committed(offsets)
        self.counts["committed"] += len(offsets)

    def _flow_control(self, consumer: Any) -> None:
        assigned = consumer.assignment()
        paused = consumer.paused()
        if self._draining.is_set():
            pause = [tp for tp in assigned if tp not in paused]
            if pause:
                consumer.pause(*pause)
            return
        room = self._room()
        with self._lock:
            waiting = {tp for tp, queued in self._backlog.items() if queued}
        arrivals = [tp for tp in assigned if tp.topic == self.settings.topics.arrivals]
        hold = [tp for tp in arrivals if not room or tp in waiting]
        pause = [tp for tp in hold if tp not in paused]
        resume = [tp for tp in arrivals if tp in paused and tp not in hold]
        if pause:
            consumer.pause(*pause)
        if resume:
            consumer.resume(*resume)


class _Rebalance(ConsumerRebalanceListener):
    """Rebalance listener; runs on kafka-python's IO thread, so only non-blocking calls here."""

    def __init__(self, source: KafkaSource, consumer: Any) -> None:
        self.source, self.consumer = source, consumer

    def on_partitions_revoked(self, revoked: Any) -> None:
        source = self.source
        source._drain_acks()
        offsets = source.tracker.to_commit(revoked)
        if offsets:
            self.consumer.commit_async({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
        source.tracker.drop(revoked)
        source._drop_backlog(revoked)
        source._revoke_ownership()
        if revoked:
            log.info("partitions revoked", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in revoked),
                     committed=len(offsets))

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.source._assigned(assigned)
        log.info("partitions assigned", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))

    def on_partitions_lost(self, lost: Any) -> None:
        self.source.tracker.drop(lost)
        self.source._drop_backlog(lost)
        self.source._revoke_ownership()
        log.warning("partitions lost (group membership expired)",
                    partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in lost))


__all__ = ["AssociationRouting", "KafkaSource"]
