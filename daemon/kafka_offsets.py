"""Which consumed offsets may be committed: per partition, everything below the oldest unfinished one.

The Kafka source hands messages to the daemon and keeps polling; the daemon finishes them in any
order. Kafka commits one number per partition ("everything below this is done"), so the committable
offset of a partition is its lowest offset still in flight, or one past the highest offset seen
when nothing is in flight. Gaps in the offsets (compaction, transaction markers) need no care.

A partition revoked and later assigned again starts a new *epoch*: acknowledgements that still
arrive for the old epoch (a job that kept running) are ignored, so they can never commit past a
redelivered copy of the same message that is in flight again.

Thread-safe (acks arrive from the daemon's thread, rebalance callbacks from kafka-python's IO thread).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable


@dataclass(frozen=True)
class Ticket:
    """One message handed out: its partition, the partition's epoch then, and its offset."""

    partition: Hashable
    epoch: int
    offset: int


@dataclass
class PartitionProgress:
    """Offsets of one partition in the current epoch."""

    epoch: int
    in_flight: set[int] = field(default_factory=set)
    next_offset: int | None = None       # one past the highest offset seen
    committed: int | None = None         # last offset committed (the next one to consume)

    def commit_point(self) -> int | None:
        """The offset to commit now (next message to consume), or None when nothing was seen."""
        if self.in_flight:
            return min(self.in_flight)
        return self.next_offset

    def see(self, offset: int) -> None:
        if self.next_offset is None or offset >= self.next_offset:
            self.next_offset = offset + 1


class OffsetTracker:
    """Per-partition progress of handed-out messages; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: dict[Hashable, PartitionProgress] = {}
        self._epochs: dict[Hashable, int] = {}

    def _progress(self, partition: Hashable) -> PartitionProgress:
        progress = self._parts.get(partition)
        if progress is None:
            epoch = self._epochs.get(partition, 0) + 1
            self._epochs[partition] = epoch
            progress = self._parts[partition] = PartitionProgress(epoch)
        return progress

    def begin(self, partition: Hashable, offset: int) -> Ticket:
        """A message handed to the daemon: in flight until :meth:`finish`."""
        with self._lock:
            progress = self._progress(partition)
            progress.see(offset)
            progress.in_flight.add(offset)
            return Ticket(partition, progress.epoch, offset)

    def skip(self, partition: Hashable, offset: int) -> None:
        """A message finished on the spot (malformed, announcement handled inline)."""
        with self._lock:
            self._progress(partition).see(offset)

    def finish(self, ticket: Ticket) -> bool:
        """The daemon is done with a message; False when the ticket is stale (partition revoked since)."""
        with self._lock:
            progress = self._parts.get(ticket.partition)
            if progress is None or progress.epoch != ticket.epoch or ticket.offset not in progress.in_flight:
                return False
            progress.in_flight.discard(ticket.offset)
            return True

    def to_commit(self, partitions: Iterable[Hashable] | None = None) -> dict[Hashable, int]:
        """{partition: offset} that advanced since the last :meth:`committed` (optionally only these)."""
        with self._lock:
            wanted = self._parts if partitions is None else [p for p in partitions if p in self._parts]
            out = {}
            for partition in wanted:
                progress = self._parts[partition]
                point = progress.commit_point()
                if point is not None and (progress.committed is None or point > progress.committed):
                    out[partition] = point
            return out

    def committed(self, offsets: dict[Hashable, int]) -> None:
        """Record a successful commit of ``offsets`` (ignores partitions dropped meanwhile)."""
        with self._lock:
            for partition, offset in offsets.items():
                progress = self._parts.get(partition)
                if progress is not None and (progress.committed is None or offset > progress.committed):
                    progress.committed = offset

    def drop(self, partitions: Iterable[Hashable]) -> None:
        """Forget partitions (revoked or lost): their outstanding tickets become stale."""
        with self._lock:
            for partition in partitions:
                self._parts.pop(partition, None)

    def partitions(self) -> list[Hashable]:
        with self._lock:
            return list(self._parts)

    def in_flight(self, where: Callable[[Hashable], bool] | None = None) -> int:
        """Messages handed out and not finished, over all partitions (or those ``where`` accepts)."""
        with self._lock:
            return sum(len(p.in_flight) for k, p in self._parts.items() if where is None or where(k))


__all__ = ["OffsetTracker", "PartitionProgress", "Ticket"]
