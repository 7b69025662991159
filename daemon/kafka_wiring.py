"""``[kafka]`` in calstream.toml: attach the Kafka source, sink, broadcast reader and association
router to a daemon (registered in ``service.COMPONENTS``, called before the daemon starts)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .kafka_associations import AssociationRouter
from .kafka_broadcast import BroadcastReader
from .kafka_settings import KafkaSettings, kafka_settings
from .kafka_sink import KafkaSink
from .kafka_source import KafkaSource
from .sinks import error_event


@dataclass
class KafkaComponents:
    """What :func:`attach_kafka` added to the daemon (tests and the status output look at them)."""

    settings: KafkaSettings
    sink: KafkaSink
    router: AssociationRouter
    source: KafkaSource
    reader: BroadcastReader


def attach_kafka(daemon: Any) -> KafkaComponents:
    """Consume arrivals (group ``group_id``), association events and CRDS contexts; publish product,
    error and association events; gate stage 3 on association ownership."""
    settings = kafka_settings(daemon.config.section("kafka"))
    # kafka-python logs every metadata refresh (INFO) and every reconnect attempt of an outage
    # (ERROR, several a second); the components log the outage once with its cause and report it
    # on /healthz, so kafka-python speaks only at DEBUG
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
    metrics = daemon.metrics
    sink = KafkaSink(settings, health=metrics, registry=metrics.registry)
    daemon.add_sink(sink)
    router = AssociationRouter(settings, daemon, sink.send, publish_error=sink.publish)
    daemon.add_sink(router)
    daemon.stage3_gate = router.owns
    source = KafkaSource(settings, has_capacity=daemon.has_capacity, publish_error=sink.publish,
                         max_in_flight=settings.max_in_flight or 2 * daemon.config.workers, routing=router,
                         health=metrics)
    daemon.add_source(source)
    reader = BroadcastReader(
        settings, on_context=daemon.on_context_change, on_association_event=router.learn,
        on_caught_up=router.caught_up, health=metrics,
        on_malformed=lambda origin, reason: sink.publish(error_event(
            path=origin, reason=reason, error_class="MalformedMessage", stage="contexts")))
    daemon.add_source(reader)
    components = KafkaComponents(settings, sink, router, source, reader)
    daemon.kafka = components
    return components


__all__ = ["KafkaComponents", "attach_kafka"]
