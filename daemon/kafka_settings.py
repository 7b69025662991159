"""The ``[kafka]`` section of calstream.toml, and the kafka-python client options made from it.

::

    [kafka]
    bootstrap_servers = ["kafka-1:9092", "kafka-2:9092"]   # or one "host:port,host:port" string
    group_id = "calstream"          # every daemon of one deployment: the same group
    create_topics = true            # create missing topics (partitions, replication_factor below)
    partitions = 6
    replication_factor = 1
    session_timeout_ms = 10000
    heartbeat_interval_ms = 3000
    max_in_flight = 4               # arrivals a daemon works on at once (default: 2 x workers)
    # security, passed through to kafka-python unchanged:
    security_protocol = "SASL_SSL"
    sasl_mechanism = "SCRAM-SHA-512"
    sasl_plain_username = "calstream"
    sasl_plain_password_env = "KAFKA_PASSWORD"   # any security key + "_env": read from the environment
    ssl_cafile = "/etc/calstream/ca.pem"

    [kafka.topics]
    arrivals = "calstream.arrivals"              # exposure / association arrivals (consumed by the group)
    contexts = "calstream.crds-contexts"         # CRDS context announcements (every daemon reads all)
    products = "calstream.products"              # product events (produced)
    errors = "calstream.errors"                  # error events (produced)
    associations = "calstream.association-events"  # association declarations and member completions

A typo (an unknown key) is a :class:`~calstream.daemon.config.ConfigError`, as in ``[daemon]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .config import ConfigError

#: kafka-python security options passed through unchanged (SASL/SSL); ``<key>_env`` reads the
#: value from the named environment variable instead (passwords from Kubernetes secrets).
SECURITY_KEYS = (
    "security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password",
    "sasl_kerberos_name", "sasl_kerberos_service_name", "sasl_kerberos_domain_name",
    "ssl_check_hostname", "ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_crlfile", "ssl_password",
    "ssl_ciphers",
)


@dataclass(frozen=True)
class KafkaTopics:
    """Topic names: what the daemons consume (arrivals, contexts, associations) and produce."""

    arrivals: str = "calstream.arrivals"
    contexts: str = "calstream.crds-contexts"
    products: str = "calstream.products"
    errors: str = "calstream.errors"
    associations: str = "calstream.association-events"

    def all(self) -> tuple[str, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class KafkaSettings:
    """Everything the Kafka source and sink need. Times in ms unless the name says ``_s``."""

    bootstrap_servers: tuple[str, ...] = ("localhost:9092",)
    group_id: str = "calstream"
    client_id: str = "calstream"
    topics: KafkaTopics = field(default_factory=KafkaTopics)
    create_topics: bool = True
    partitions: int = 6
    replication_factor: int = 1
    session_timeout_ms: int = 10000
    heartbeat_interval_ms: int = 3000
    max_poll_interval_ms: int = 300000
    request_timeout_ms: int = 10000
    poll_timeout_ms: int = 200
    max_poll_records: int = 16
    max_in_flight: int | None = None        # unfinished arrivals per daemon; default 2 x workers
    probe_interval_s: float = 2.0
    retry_backoff_max_s: float = 10.0
    max_buffered_events: int = 100000
    security: Mapping[str, Any] = field(default_factory=dict)

    def client_options(self) -> dict[str, Any]:
        """Options every kafka-python client of calstream gets (servers, id, security, timeouts)."""
        return {"bootstrap_servers": list(self.bootstrap_servers), "client_id": self.client_id,
                "request_timeout_ms": self.request_timeout_ms, "reconnect_backoff_max_ms": 2000,
                **dict(self.security)}

    def consumer_options(self, *, group: bool = True) -> dict[str, Any]:
        """KafkaConsumer options: manual commits, earliest offsets, no topic auto-creation."""
        options = {**self.client_options(), "enable_auto_commit": False, "auto_offset_reset": "earliest",
                   "allow_auto_create_topics": False, "max_poll_records": self.max_poll_records,
                   "metadata_max_age_ms": 30000}
        if group:
            options.update(group_id=self.group_id, session_timeout_ms=self.session_timeout_ms,
                           heartbeat_interval_ms=self.heartbeat_interval_ms,
                           max_poll_interval_ms=self.max_poll_interval_ms)
        return options

    def producer_options(self) -> dict[str, Any]:
        """KafkaProducer options: acks from every in-sync replica, idempotent retries, bounded waits."""
        return {**self.client_options(), "acks": "all", "enable_idempotence": True, "linger_ms": 5,
                "max_block_ms": self.request_timeout_ms, "delivery_timeout_ms": 3 * self.request_timeout_ms}


def ensure_topics(settings: KafkaSettings, names: tuple[str, ...] | None = None) -> list[str]:
    """Create the topics among ``names`` (default: all configured) that the cluster lacks, with
    ``settings.partitions`` partitions; returns the names created. Raises kafka errors (broker down)."""
    from kafka import KafkaAdminClient  # noqa: PLC0415
    from kafka.admin import NewTopic  # noqa: PLC0415
    from kafka.errors import TopicAlreadyExistsError  # noqa: PLC0415

    wanted = settings.topics.all() if names is None else names
    admin = KafkaAdminClient(**settings.client_options())
    try:
        existing = set(admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        for topic in missing:
            try:
                admin.create_topics([NewTopic(topic, settings.partitions, settings.replication_factor)])
            except TopicAlreadyExistsError:  # another daemon was quicker
                pass
        return missing
    finally:
        admin.close()


_INT_KEYS = ("partitions", "replication_factor", "session_timeout_ms", "heartbeat_interval_ms",
             "max_poll_interval_ms", "request_timeout_ms", "poll_timeout_ms", "max_poll_records",
             "max_buffered_events", "max_in_flight")
_FLOAT_KEYS = ("probe_interval_s", "retry_backoff_max_s")


def kafka_settings(section: Mapping[str, Any], *, environ: Mapping[str, str] | None = None) -> KafkaSettings:
    """Validate a raw ``[kafka]`` TOML table; ConfigError naming the key for anything wrong."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    security: dict[str, Any] = {}
    for key, value in section.items():
        if key == "topics":
            values["topics"] = _topics(value)
        elif key == "bootstrap_servers":
            values[key] = _servers(value)
        elif key in ("group_id", "client_id"):
            values[key] = _text(key, value)
        elif key == "create_topics":
            if not isinstance(value, bool):
                raise ConfigError(f"[kafka] create_topics must be true or false, got {value!r}")
            values[key] = value
        elif key in _INT_KEYS:
            values[key] = _positive(key, value, int)
        elif key in _FLOAT_KEYS:
            values[key] = _positive(key, value, float)
        elif key in SECURITY_KEYS:
            security[key] = value
        elif key.endswith("_env") and key[:-4] in SECURITY_KEYS:
            if str(value) not in environ:
                raise ConfigError(f"[kafka] {key}: environment variable {value!r} is not set")
            security[key[:-4]] = environ[str(value)]
        else:
            known = sorted({f.name for f in fields(KafkaSettings)} - {"security"} | set(SECURITY_KEYS))
            raise ConfigError(f"[kafka] unknown setting {key!r}; known: {', '.join(known)} (and <security key>_env)")
    settings = KafkaSettings(**values, security=security)
    if settings.heartbeat_interval_ms >= settings.session_timeout_ms:
        raise ConfigError("[kafka] heartbeat_interval_ms must be below session_timeout_ms")
    return settings


def _topics(value: Any) -> KafkaTopics:
    if not isinstance(value, Mapping):
        raise ConfigError("[kafka.topics] must be a table of topic names")
    names = {f.name for f in fields(KafkaTopics)}
    unknown = set(value) - names
    if unknown:
        raise ConfigError(f"[kafka.topics] unknown topic role(s) {sorted(unknown)}; known: {', '.join(sorted(names))}")
    topics = KafkaTopics(**{k: _text(f"topics.{k}", v) for k, v in value.items()})
    if len(set(topics.all())) != len(topics.all()):
        raise ConfigError(f"[kafka.topics] every role needs its own topic, got {topics.all()}")
    return topics


def _servers(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"[kafka] bootstrap_servers must be a list of host:port, got {value!r}")
    servers = tuple(str(s).strip() for s in items if str(s).strip())
    for server in servers:
        host, _, port = server.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"[kafka] bootstrap_servers: {server!r} is not host:port")
    if not servers:
        raise ConfigError("[kafka] bootstrap_servers is empty")
    return servers


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"[kafka] {key} must be a non-empty string, got {value!r}")
    return value.strip()


def _positive(key: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"[kafka] {key} must be a positive number, got {value!r}")
    if kind is int and int(value) != value:
        raise ConfigError(f"[kafka] {key} must be a whole number, got {value!r}")
    return kind(value)


__all__ = ["KafkaSettings", "KafkaTopics", "SECURITY_KEYS", "ensure_topics", "kafka_settings"]
