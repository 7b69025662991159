"""Several real ``calstream daemon`` processes in one Kafka consumer group, for tests and benchmarks.

    cluster = KafkaCluster(broker, workdir, crds_path=..., prefix="t1")
    a, b = cluster.daemon("a"), cluster.daemon("b")       # started, each with its own ledger
    cluster.publish_arrivals(paths)                       # JSON {"path": ...} on the arrivals topic
    events = cluster.events                               # product/error events seen on the topics
    a.kill()                                              # SIGKILL
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from kafka_broker import TansuBroker, free_port, wait_for

CALSTREAM = [sys.executable, "-m", "calstream.daemon.cli"]
TOPIC_ROLES = ("arrivals", "contexts", "products", "errors", "associations")


def kafka_toml(broker: TansuBroker, prefix: str, partitions: int) -> str:
    """The ``[kafka]`` section for a test cluster: short timeouts, per-test topic names."""
    topics = "\n".join(f'{role} = "{prefix}.{role}"' for role in TOPIC_ROLES)
    return (f'[kafka]\nbootstrap_servers = ["{broker.bootstrap}"]\ngroup_id = "{prefix}"\n'
            f"partitions = {partitions}\nsession_timeout_ms = 6000\nheartbeat_interval_ms = 1000\n"
            "request_timeout_ms = 3000\npoll_timeout_ms = 100\nprobe_interval_s = 1.0\n"
            f"retry_backoff_max_s = 2.0\n\n[kafka.topics]\n{topics}\n")


@dataclass
class DaemonProcess:
    """One ``calstream daemon`` process with its own ledger, inbox and metrics port."""

    name: str
    config: Path
    ledger: Path
    metrics_port: int
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self, env: dict[str, str], log_level: str = "INFO") -> "DaemonProcess":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(CALSTREAM + ["--log-json", "--log-level", log_level, "daemon", "--config",
                                                     str(self.config)],
                                        stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL (no clean-up at all)."""
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process is None:
            return 0
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def healthz(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=2) as reply:
                return json.loads(reply.read())
        except Exception:  # noqa: BLE001 - not up (yet) or 503
            return None

    def query(self, sql: str, args: Iterable[Any] = ()) -> list[tuple]:
        """Read the ledger (read-only, while the daemon runs)."""
        if not self.ledger.exists():
            return []
        db = sqlite3.connect(f"file:{self.ledger}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(sql, tuple(args)).fetchall()
        finally:
            db.close()

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out


@dataclass
class KafkaCluster:
    """Daemons sharing one product tree and one consumer group on a broker."""

    broker: TansuBroker
    workdir: Path
    crds_path: Path
    prefix: str
    partitions: int = 4
    workers: int = 1
    extra_daemon_toml: str = ""
    log_level: str = "INFO"
    daemons: list[DaemonProcess] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    _collector: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _reset: threading.Event = field(default_factory=threading.Event)

    def topic(self, role: str) -> str:
        return f"{self.prefix}.{role}"

    @property
    def products(self) -> Path:
        return self.workdir / "products"

    def create_topics(self) -> None:
        self.broker.create_topics({self.topic(r): self.partitions for r in TOPIC_ROLES})

    def daemon(self, name: str) -> DaemonProcess:
        """Write the config of daemon ``name`` (first time) and start it."""
        home = self.workdir / name
        (home / "inbox").mkdir(parents=True, exist_ok=True)
        config = home / "calstream.toml"
        port = free_port()
        config.write_text(
            f'[daemon]\ninbox = ["{home / "inbox"}"]\noutput_dir = "{self.products}"\n'
            f'ledger = "{home / "ledger.sqlite"}"\nquarantine = "{self.workdir / "quarantine"}"\n'
            f"workers = {self.workers}\nmetrics_port = {port}\ngrace_seconds = 20\n{self.extra_daemon_toml}\n"
            f'[crds]\npath = "{self.crds_path}"\n\n' + kafka_toml(self.broker, self.prefix, self.partitions))
        env = dict(os.environ, CRDS_PATH=str(self.crds_path),
                   CRDS_SERVER_URL="https://crds-serverless-mode.stsci.edu", CRDS_OBSERVATORY="jwst")
        existing = [d for d in self.daemons if d.name == name]
        if existing:
            process = existing[0]
            process.metrics_port = port
        else:
            process = DaemonProcess(name, config, home / "ledger.sqlite", port, home / "daemon.log")
            self.daemons.append(process)
        return process.start(env, self.log_level)

    def wait_members(self, count: int, timeout: float = 40.0) -> None:
        """Until ``count`` running daemons have arrival partitions and report healthy."""
        def ready() -> bool:
            up = [d for d in self.daemons if d.alive()]
            return len(up) >= count and all(self.assigned(d) for d in up)
        if not wait_for(ready, timeout):
            raise TimeoutError(f"{count} daemons did not join the group within {timeout} s")

    def assigned(self, daemon: DaemonProcess) -> bool:
        """True once the daemon's last partition-assignment log line gave it arrival partitions."""
        last = None
        for line in daemon.log_lines():
            if line.get("event") in ("partitions assigned", "partitions revoked"):
                last = line
        return bool(last and last["event"] == "partitions assigned"
                    and any(p.startswith(self.topic("arrivals")) for p in last.get("partitions", [])))

    # -- traffic ---------------------------------------------------------------------------------

    def publish_arrivals(self, paths: Iterable[Path | str], *, raw: Iterable[bytes] = (), spread: bool = True) -> None:
        """One JSON arrival per path (``spread``: round-robin over the partitions, so every member
        of the group gets some); ``raw`` values are sent as they are."""
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.broker.bootstrap, acks="all")
        try:
            for i, path in enumerate(paths):
                key = Path(path).name.encode()
                producer.send(self.topic("arrivals"), key=key, value=json.dumps({"path": str(path)}).encode(),
                              partition=i % self.partitions if spread else None)
            for value in raw:
                producer.send(self.topic("arrivals"), value=value)
            producer.flush(10)
        finally:
            producer.close()

    def publish_context(self, context: str) -> None:
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.broker.bootstrap, acks="all")
        try:
            producer.send(self.topic("contexts"), value=json.dumps({"context": context}).encode()).get(10)
        finally:
            producer.close()

    def collect_events(self) -> None:
        """Start a thread that appends every product/error event (with its key) to ``events``."""
        self._collector = threading.Thread(target=self._collect, daemon=True)
        self._collector.start()

    def reset_collector(self) -> None:
        """After a broker restart (empty topics): read the new topics from their beginning."""
        self._reset.set()

    def _collect(self) -> None:
        from kafka import KafkaConsumer

        consumer = None
        while not self._stop.is_set():
            try:
                if self._reset.is_set() and consumer is not None:
                    self._reset.clear()
                    raise ConnectionResetError("broker restarted")
                if consumer is None:
                    consumer = KafkaConsumer(self.topic("products"), self.topic("errors"),
                                             bootstrap_servers=self.broker.bootstrap, auto_offset_reset="earliest",
                                             request_timeout_ms=3000, metadata_max_age_ms=2000)
                for records in consumer.poll(timeout_ms=200).values():
                    for r in records:
                        event = json.loads(r.value)
                        event.update(_key=r.key.decode() if r.key else None, _topic=r.topic, _at=time.time())
                        self.events.append(event)
            except Exception:  # noqa: BLE001 - broker restarting: new consumer
                if consumer is not None:
                    try:
                        consumer.close(autocommit=False)
                    except Exception:  # noqa: BLE001
                        pass
                consumer = None
                time.sleep(0.5)
        if consumer is not None:
            consumer.close(autocommit=False)

    def products_of(self, product_type: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("type") == "product" and e.get("product_type") == product_type]

    def close(self) -> None:
        self._stop.set()
        for daemon in self.daemons:
            if daemon.alive():
                try:
                    daemon.terminate(timeout=30)
                except subprocess.TimeoutExpired:
                    daemon.kill()
        if self._collector is not None:
            self._collector.join(timeout=5)
