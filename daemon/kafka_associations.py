"""Associations across daemons: exactly one owner per association, members from anywhere.

Several daemons share the arrivals, so an association's members are calibrated on different
machines (their cal products on shared storage). Kafka decides who owns an association: every
association event is keyed by its ``asn_id`` on the association-events topic, which the daemons
consume in the same group as the arrivals — the member holding that partition owns the association,
registers it in its ledger and runs its stage 3, once.

Events (JSON, key = asn_id)::

    {"type": "declared", "asn_id", "asn_path", "members": [member stems], "node"}
    {"type": "member", "asn_id", "node", "exposure": {ExposureInfo}, "input": {...}, "product": {...}}
    {"type": "completed", "asn_id", "node", "path"}     # a stage 3 product exists

1. An ``*_asn.json`` arriving on the arrivals topic (any daemon) is read and published as
   ``declared``; its arrival offset is finished once the broker has the declaration.
2. The owner receives ``declared`` and submits the asn file to its daemon; the offset stays
   unfinished (uncommitted) until stage 3 is done, so a new owner after a rebalance or a crash gets
   the declaration and every later member event of that partition again.
3. Every daemon reads every declaration (:class:`~calstream.daemon.kafka_broadcast.BroadcastReader`),
   so it knows which associations each exposure belongs to. When it calibrates a member (a cal
   product event) — or learns of a declaration whose members it calibrated before — it publishes
   ``member`` with the exposure's ledger record and its cal product.
4. The owner records a ``member`` of another daemon as a *remote* exposure (input state "remote")
   with a done image2 job and its cal product — ledger API only — and the scheduler sees the
   association complete exactly as with local members.
5. Only the owner runs stage 3: :meth:`AssociationRouter.owns` is the scheduler's stage-3 gate
   (an association that came through Kafka may run only while its partition is assigned here).
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Mapping

import structlog

from calstream.steps.errors import InputError

from .intake import read_association_info
from .kafka_messages import ArrivalMessage, MessageError, _json_object, encode_event
from .kafka_settings import KafkaSettings
from .ledger import AssociationRecord, ExposureInfo, JobSpec, Ledger, NewProduct
from .sinks import error_event
from .sources import Arrival

log = structlog.get_logger("calstream.daemon.kafka_associations")

REMOTE_STATE = "remote"
#: a member event whose cal product is not on the shared storage yet is tried this often, this far apart
MEMBER_FILE_TRIES = 12
MEMBER_FILE_RETRY_SECONDS = 5.0
_INFO_FIELDS = tuple(f.name for f in fields(ExposureInfo))


def node_name() -> str:
    """``host:pid`` of this daemon (in events and remote origins)."""
    return f"{socket.gethostname()}:{os.getpid()}"



def origin_partition(origin: str | None, topic: str) -> int | None:
    """The partition in ``kafka:<topic>/<partition>/<offset>``, None for other origins."""
    prefix = f"kafka:{topic}/"
    if not origin or not origin.startswith(prefix):
        return None
    try:
        return int(origin[len(prefix):].split("/", 1)[0])
    except ValueError:
        return None


class AssociationRouter:
    """The three roles above for one daemon: router for the Kafka source, :class:`Sink` for the
    daemon's product events, listener of the broadcast reader, and the scheduler's stage-3 gate.

    ``daemon`` needs ``ledger``, ``scheduler``, ``call_soon(fn)`` and ``config.output_dir``.
    ``send(topic, key, value, on_delivered)`` is the Kafka sink's ordered, retried send.
    """

    def __init__(self, settings: KafkaSettings, daemon: Any, send: Callable[..., None], *,
                 publish_error: Callable[[Mapping[str, Any]], None], node: str | None = None) -> None:
        self.settings = settings
        self.topic = settings.topics.associations
        self.daemon = daemon
        self._send = send
        self.publish_error = publish_error
        self.node = node or node_name()
        self._lock = threading.Lock()
        self._owned: set[int] = set()                    # association partitions assigned here
        self._members: dict[str, set[str]] = {}          # member stem -> asn_ids (all declarations)
        self._declared: dict[str, tuple[str, ...]] = {}  # asn_id -> member stems
        self._completed: set[str] = set()
        self._caught_up = False
        self.counts = {"declared": 0, "owned": 0, "member_sent": 0, "remote_recorded": 0}

    # -- Kafka source side (poll thread) ------------------------------------------------------------

    def declare(self, message: ArrivalMessage, origin: str, done: Callable[[], None],
                submit: Callable[[Arrival], None]) -> None:
        """An asn file arrived: publish its declaration (``done`` once the broker has it). A bad
        asn file goes to the local daemon, which quarantines it."""
        try:
            info = read_association_info(message.path, Path(self.daemon.config.output_dir))
        except InputError as exc:
            log.warning("bad association file: quarantined locally", path=str(message.path), error=str(exc))
            submit(Arrival(path=message.path, kind="asn", origin=origin, size=message.size,
                           checksum=message.checksum, ack=lambda outcome: done()))
            return
        event = {"type": "declared", "asn_id": info.asn_id, "asn_path": str(message.path),
                 "members": [m.stem for m in info.members], "node": self.node, "arrival": origin}
        self._send(self.topic, info.asn_id, encode_event(event), on_delivered=done)
        self.counts["declared"] += 1
        log.info("association declared", asn_id=info.asn_id, members=len(info.members), origin=origin)

    def handle(self, value: bytes | None, origin: str, submit: Callable[[Arrival], None],
               done: Callable[[], None]) -> None:
        """An association event of a partition this daemon owns."""
        try:
            event = _json_object(value)
            kind = event.get("type")
            asn_id = event.get("asn_id")
            if not isinstance(asn_id, str) or kind not in ("declared", "member", "completed"):
                raise MessageError(f"not an association event: type={kind!r}, asn_id={asn_id!r}")
        except MessageError as exc:
            self.publish_error(error_event(path=origin, reason=str(exc), error_class="MalformedMessage",
                                           stage="associations"))
            done()
            return
        if kind == "declared":
            if not isinstance(event.get("asn_path"), str) or not event["asn_path"].startswith("/"):
                self.publish_error(error_event(path=origin, reason=f"declaration of {asn_id} without an absolute "
                                               "asn_path", error_class="MalformedMessage", stage="associations"))
                done()
                return
            self.counts["owned"] += 1
            log.info("association owned here", asn_id=asn_id, origin=origin)
            submit(Arrival(path=Path(str(event["asn_path"])), kind="asn", origin=origin,
                           ack=lambda outcome: done()))
        elif kind == "member":
            self.daemon.call_soon(lambda: self._record_then(event, done))
        else:
            done()

    def assignment_changed(self, partitions: set[int]) -> None:
        """The association partitions assigned here now (poll thread); re-checks what we own."""
        with self._lock:
            gained = set(partitions) - self._owned
            self._owned = set(partitions)
        log.info("association partitions owned", partitions=sorted(partitions))
        if gained:
            self.daemon.call_soon(self._refresh_owned)

    def revoked(self) -> None:
        """Partitions revoked (kafka-python's IO thread): own nothing until the next assignment."""
        with self._lock:
            self._owned = set()

    # -- stage-3 gate (main thread) -----------------------------------------------------------------

    def owns(self, asn: AssociationRecord) -> bool:
        """May this daemon run stage 3 of ``asn``? Associations fed through Kafka: only while their
        partition is assigned here; any other (a local inbox): yes."""
        if asn.input_id is None:
            return True
        ledger: Ledger = self.daemon.ledger
        partition = origin_partition(ledger.input(asn.input_id).origin, self.topic)
        if partition is None:
            return True
        with self._lock:
            return partition in self._owned

    def _refresh_owned(self) -> None:
        ledger, scheduler = self.daemon.ledger, self.daemon.scheduler
        with ledger.transaction():
            for asn in ledger.associations_in_state("waiting", "stuck", "done"):
                if self.owns(asn):
                    scheduler.refresh(asn)

    # -- remote members (main thread) ----------------------------------------------------------------

    def _record_then(self, event: Mapping[str, Any], done: Callable[[], None], attempt: int = 1) -> None:
        try:
            if record_remote_member(self.daemon.ledger, self.daemon.scheduler, event):
                self.counts["remote_recorded"] += 1
        except FileNotFoundError as exc:
            if attempt < MEMBER_FILE_TRIES:             # shared storage may show the file late (NFS)
                log.warning("member's cal product not visible yet; trying again", asn_id=event.get("asn_id"),
                            attempt=attempt, retry_in=MEMBER_FILE_RETRY_SECONDS)
                timer = threading.Timer(MEMBER_FILE_RETRY_SECONDS, self.daemon.call_soon,
                                        (lambda: self._record_then(event, done, attempt + 1),))
                timer.daemon = True
                timer.start()
                return                                  # not done: the offset stays uncommitted
            self.publish_error(error_event(path=str((event.get("product") or {}).get("path")), reason=str(exc),
                                           error_class=type(exc).__name__, stage="associations"))
        except Exception as exc:  # noqa: BLE001 - a bad event must not block the partition
            log.exception("member event not usable", asn_id=event.get("asn_id"))
            self.publish_error(error_event(path=str((event.get("product") or {}).get("path")), reason=str(exc),
                                           error_class=type(exc).__name__, stage="associations"))
        done()

    # -- broadcast side (reader thread) -------------------------------------------------------------

    def learn(self, value: bytes | None, origin: str) -> None:
        """Every association event of every partition: keep the membership map up to date."""
        try:
            event = _json_object(value)
        except MessageError:
            return                                       # the owner reports it
        asn_id, kind = event.get("asn_id"), event.get("type")
        if not isinstance(asn_id, str):
            return
        if kind == "completed":
            with self._lock:
                self._completed.add(asn_id)
        if kind != "declared" or not isinstance(event.get("members"), list):
            return
        stems = tuple(str(s) for s in event["members"])
        with self._lock:
            self._declared[asn_id] = stems
            self._completed.discard(asn_id)
            for stem in stems:
                self._members.setdefault(stem, set()).add(asn_id)
            live = self._caught_up
        if live:
            self.daemon.call_soon(lambda: self._report_members_of(asn_id))

    def caught_up(self) -> None:
        """The reader has every past declaration: report members calibrated here before."""
        with self._lock:
            self._caught_up = True
            pending = [a for a in self._declared if a not in self._completed]
        if pending:
            self.daemon.call_soon(lambda: [self._report_members_of(a) for a in pending])

    def _report_members_of(self, asn_id: str) -> None:
        ledger: Ledger = self.daemon.ledger
        with self._lock:
            stems = self._declared.get(asn_id, ())
        for stem in stems:
            for exposure in ledger.exposures_matching(stem):
                self._send_member(asn_id, exposure)

    # -- Sink side (main thread) ---------------------------------------------------------------------

    def publish(self, event: Mapping[str, Any]) -> None:
        """Product events: a member's cal product -> ``member`` events; a stage 3 product ->
        ``completed``."""
        if event.get("type") != "product":
            return
        if event.get("stage") == "image3" and event.get("association"):
            self._send(self.topic, str(event["association"]), encode_event(
                {"type": "completed", "asn_id": event["association"], "node": self.node, "path": event.get("path")}))
            return
        if event.get("product_type") != "cal" or not event.get("exposure"):
            return
        ledger: Ledger = self.daemon.ledger
        for exposure in ledger.exposures_matching(str(event["exposure"])):
            for asn_id in self._associations_of(exposure.stem, exposure.exposure_name):
                self._send_member(asn_id, exposure)

    def close(self) -> None:
        return None

    def _associations_of(self, stem: str, name: str) -> set[str]:
        with self._lock:
            found = set(self._members.get(stem, ())) | set(self._members.get(name, ()))
        ledger: Ledger = self.daemon.ledger
        found |= {a.asn_id for a in ledger.associations_with_member(stem, name)}
        return found

    def _send_member(self, asn_id: str, exposure: Any) -> None:
        """Publish the cal product of a LOCAL exposure as a member of ``asn_id``."""
        ledger: Ledger = self.daemon.ledger
        source = ledger.input(exposure.input_id)
        if source.state == REMOTE_STATE:
            return
        cals = [p for p in ledger.current_products(exposure_id=exposure.id, stage="image2") if p.kind == "cal"]
        if not cals:
            return
        cal = cals[-1]
        event = {"type": "member", "asn_id": asn_id, "node": self.node,
                 "exposure": {k: getattr(exposure, k) for k in _INFO_FIELDS},
                 "input": {"path": source.path, "checksum": source.checksum, "size": source.size},
                 "product": {"path": cal.path, "kind": cal.kind, "checksum": cal.checksum, "size": cal.size,
                             "crds_context": cal.crds_context, "references": cal.references,
                             "cal_ver": cal.cal_ver}}
        self._send(self.topic, asn_id, encode_event(event))
        self.counts["member_sent"] += 1
        log.info("member calibrated here, reported to the owner", asn_id=asn_id, exposure=exposure.stem)


def record_remote_member(ledger: Ledger, scheduler: Any, event: Mapping[str, Any]) -> bool:
    """Record another daemon's calibrated member (main thread); False when already known.

    The exposure gets an input row in state "remote" (never calibrated or re-queued here), an
    exposure row with the sender's ExposureInfo, and a done image2 job whose product is the cal
    file on shared storage; then the scheduler re-checks its associations.
    """
    info = ExposureInfo(**{**{k: event["exposure"][k] for k in _INFO_FIELDS},
                           "shape": tuple(event["exposure"]["shape"])})
    product, source = event["product"], event.get("input") or {}
    if not Path(product["path"]).is_file():
        raise FileNotFoundError(f"member {info.stem} of {event['asn_id']}: cal product {product['path']} "
                                "is not on the shared storage here")
    for exposure in ledger.exposures_matching(info.stem):
        if exposure.stem != info.stem:
            continue
        for known in ledger.current_products(exposure_id=exposure.id, stage="image2"):
            if known.kind == "cal" and known.path == product["path"] and known.checksum == product["checksum"]:
                return False
    with ledger.transaction():
        remote = [e for e in ledger.exposures_matching(info.stem)
                  if e.stem == info.stem and ledger.input(e.input_id).state == REMOTE_STATE]
        if remote:
            exposure_id = remote[0].id
        else:
            input_id = ledger.add_input(source.get("path") or info.path, "uncal", origin=f"remote:{event['node']}",
                                        checksum=source.get("checksum"), size=source.get("size"), mtime_ns=None,
                                        state=REMOTE_STATE)
            exposure_id = ledger.add_exposure(input_id, info)
        job_id = ledger.enqueue(JobSpec.exposure(exposure_id, "image2", reason=f"remote: calibrated by {event['node']}"),
                                lane="live")
        ledger.mark_running(job_id, 0)
        ledger.finish_job(job_id, "done", products=[NewProduct(product["path"], "cal", product.get("checksum"),
                                                               product.get("size"))],
                          context=product.get("crds_context"), references=product.get("references") or {},
                          cal_ver=product.get("cal_ver"))
        scheduler.after_job(ledger.job(job_id))
    log.info("remote member recorded", asn_id=event["asn_id"], exposure=info.stem, node=event["node"])
    return True


__all__ = ["AssociationRouter", "REMOTE_STATE", "node_name", "origin_partition", "record_remote_member"]
