"""deploy/: the operator files agree with the code — image names, ports, volumes, config paths, flags.

YAML is read with PyYAML (a dependency of asdf, so always installed); the Dockerfile and the systemd
unit with the few lines of parsing their simple line formats need; TOML with tomllib and calstream's
own config loader (so a key the daemon does not know fails here).
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import tomllib
import urllib.request
from pathlib import Path, PurePosixPath

import pytest
import yaml

from calstream.daemon.cli import _parser
from calstream.daemon.config import DaemonConfig, load_config
from calstream.daemon.kafka_settings import kafka_settings
from calstream.daemon.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CONFIG_IN_CONTAINER = "/etc/calstream/calstream.toml"
METRICS_PORT = DaemonConfig().metrics_port


def version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def image() -> str:
    return f"calstream:{version()}"


def load_yaml_documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        pending += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if line.endswith("\\") or not pending:
            continue
        keyword, _, rest = pending.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def daemon_config_from_text(text: str, tmp_path: Path, name: str) -> DaemonConfig:
    path = tmp_path / name
    path.write_text(text)
    return load_config(path, search_cwd=False)


def assert_daemon_command(argv: list[str]) -> None:
    """``argv`` (after the program name) parses as a ``calstream daemon`` command line with the
    container config, and no unknown flag."""
    args, extra = _parser().parse_known_args(argv)
    assert extra == [], f"unknown arguments {extra} in {argv}"
    assert args.command == "daemon", argv
    assert args.config == CONFIG_IN_CONTAINER, argv


def config_paths(config: DaemonConfig) -> list[PurePosixPath]:
    paths = [*config.inboxes, config.output_dir, config.ledger.parent, config.quarantine, config.crds_path]
    return [PurePosixPath(str(p)) for p in paths if p is not None]


def covered(path: PurePosixPath, mounts: list[str]) -> bool:
    return any(path == PurePosixPath(m) or PurePosixPath(m) in path.parents for m in mounts)


# ---------------------------------------------------------------------------------------------
# the example config and the systemd unit (embedded mode)
# ---------------------------------------------------------------------------------------------


def test_example_config_loads_and_its_commented_kafka_section_is_valid():
    text = (DEPLOY / "calstream.toml").read_text()
    config = load_config(DEPLOY / "calstream.toml", search_cwd=False)
    assert config.metrics_port == METRICS_PORT and "kafka" not in config.sections
    block = [line[2:] for line in text.splitlines() if re.match(r"# (\[kafka|[a-z_]+ = )", line)]
    kafka = tomllib.loads("\n".join(block))["kafka"]
    settings = kafka_settings(kafka, environ={"KAFKA_PASSWORD": "x"})
    assert settings.group_id == "calstream" and settings.security["security_protocol"] == "SASL_SSL"


def test_systemd_unit_runs_the_daemon_with_room_for_the_grace_period():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(DEPLOY / "systemd" / "calstream.service")
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/bin/calstream")
    args, extra = _parser().parse_known_args(argv[1:])
    assert extra == [] and args.command == "daemon"
    config = load_config(DEPLOY / "calstream.toml", search_cwd=False)
    assert args.config == "/etc/calstream/calstream.toml"
    assert int(service["TimeoutStopSec"]) > config.grace_seconds
    assert service["KillSignal"] == "SIGTERM"
    writable = service["ReadWritePaths"].split()
    assert all(covered(p, writable) for p in config_paths(config)), (config_paths(config), writable)
    assert unit["Install"]["WantedBy"] == "multi-user.target"


# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------


def test_dockerfile_copies_what_exists_exposes_the_metrics_port_and_runs_the_daemon():
    steps = dockerfile_instructions(DEPLOY / "Dockerfile")
    kinds = [k for k, _ in steps]
    assert kinds[0] == "FROM" and "USER" in kinds
    for keyword, rest in steps:
        if keyword == "COPY":
            *sources, _ = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    expose = [int(p) for k, r in steps if k == "EXPOSE" for p in r.split()]
    assert expose == [METRICS_PORT]
    health = next(r for k, r in steps if k == "HEALTHCHECK")
    assert f"127.0.0.1:{METRICS_PORT}/healthz" in health
    entrypoint = json.loads(next(r for k, r in steps if k == "ENTRYPOINT"))
    command = json.loads(next(r for k, r in steps if k == "CMD"))
    assert entrypoint[0] == "calstream"
    assert_daemon_command(entrypoint[1:] + command)
    copied = next(r for k, r in steps if k == "COPY" and r.endswith(CONFIG_IN_CONTAINER)).split()[0]
    config = load_config(ROOT / copied, search_cwd=False)
    volumes = json.loads(next(r for k, r in steps if k == "VOLUME"))
    assert all(covered(p, volumes) for p in config_paths(config))
    assert f"-t {image()} " in (DEPLOY / "Dockerfile").read_text()


# ---------------------------------------------------------------------------------------------
# docker compose + Prometheus
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose():
    return load_yaml_documents(DEPLOY / "docker-compose.yml")[0]


def calstream_services(compose) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if s.get("image", "").startswith("calstream:")}


def test_compose_has_a_kraft_kafka_two_replicas_and_prometheus(compose, tmp_path):
    services = compose["services"]
    assert not any("zookeeper" in str(s.get("image", "")) for s in services.values())
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert "controller" in env["KAFKA_PROCESS_ROLES"] and "KAFKA_CONTROLLER_QUORUM_VOTERS" in env
    advertised = env["KAFKA_ADVERTISED_LISTENERS"].split("//", 1)[1]

    replicas = calstream_services(compose)
    assert len(replicas) == 2
    shared_volumes = None
    for name, service in replicas.items():
        assert service["image"] == image()
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert_daemon_command(["--log-json"] + service["command"])
        assert str(METRICS_PORT) in [str(p) for p in service["expose"]]
        assert service["depends_on"]["kafka"]["condition"] == "service_healthy"
        mounts = {m.split(":")[1]: m.split(":")[0] for m in service["volumes"]}
        config = load_config(DEPLOY / mounts[CONFIG_IN_CONTAINER], search_cwd=False)
        assert config.metrics_port == METRICS_PORT and config.metrics_host == "0.0.0.0"
        assert all(covered(p, list(mounts)) for p in config_paths(config)), (name, config_paths(config))
        settings = kafka_settings(config.section("kafka"))
        assert settings.bootstrap_servers == (advertised,)
        shared = {target: src for target, src in mounts.items() if src in compose["volumes"]}
        own = mounts["/var/lib/calstream"]
        assert PurePosixPath(str(config.ledger)).parent == PurePosixPath("/var/lib/calstream")
        shared_volumes = shared_volumes or {}
        shared_volumes[name] = (shared["/data"], own)
    (a_shared, a_own), (b_shared, b_own) = shared_volumes.values()
    assert a_shared == b_shared and a_own != b_own          # products shared, ledgers not


def test_prometheus_scrapes_every_replica_on_the_metrics_port(compose):
    prometheus = load_yaml_documents(DEPLOY / "prometheus.yml")[0]
    mounted = [v for v in compose["services"]["prometheus"]["volumes"] if v.endswith(":ro")]
    assert any(v.startswith("./prometheus.yml:") for v in mounted)
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "calstream")
    assert job["metrics_path"] == "/metrics"
    targets = sorted(t for c in job["static_configs"] for t in c["targets"])
    hosts = sorted(f"{s.get('hostname', n)}:{METRICS_PORT}" for n, s in calstream_services(compose).items())
    assert targets == hosts


# ---------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests():
    kustomization = load_yaml_documents(DEPLOY / "kubernetes" / "kustomization.yaml")[0]
    docs = []
    for name in kustomization["resources"]:
        docs += load_yaml_documents(DEPLOY / "kubernetes" / name)
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_kubernetes_deployment_is_one_consumer_group_with_probes_volumes_and_config(manifests, tmp_path):
    deployment = manifests[("Deployment", "calstream")]
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == image()
    assert_daemon_command(["--log-json"] + container["args"])
    port = next(p for p in container["ports"] if p["name"] == "metrics")
    assert port["containerPort"] == METRICS_PORT
    assert spec["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS_PORT)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    config_map = manifests[("ConfigMap", volumes[mounts["/etc/calstream"]]["configMap"]["name"])]
    config = daemon_config_from_text(config_map["data"][PurePosixPath(CONFIG_IN_CONTAINER).name], tmp_path,
                                     "calstream.toml")
    assert config.metrics_port == METRICS_PORT and config.metrics_host == "0.0.0.0"
    assert all(covered(p, list(mounts)) for p in config_paths(config))
    assert volumes[mounts["/var/lib/calstream"]].get("emptyDir") == {}      # the ledger: per pod
    for mount in ("/data", str(config.crds_path)):
        claim = volumes[mounts[mount]]["persistentVolumeClaim"]["claimName"]
        assert "ReadWriteMany" in manifests[("PersistentVolumeClaim", claim)]["spec"]["accessModes"]
    settings = kafka_settings(config.section("kafka"))
    assert settings.group_id and settings.replication_factor >= 1
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > config.grace_seconds

    service = manifests[("Service", "calstream-metrics")]
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"]
    assert service["spec"]["ports"][0]["port"] == METRICS_PORT


def test_the_probe_path_is_served_by_the_daemon():
    metrics = Metrics()
    port = metrics.serve("127.0.0.1", 0)
    try:
        metrics.set_phase("running")
        metrics.set_degraded("kafka source: Kafka broker unreachable")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            assert reply.status == 200                          # degraded is alive: no restart loop
            assert json.loads(reply.read())["status"] == "degraded"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert b"calstream_health" in reply.read()
    finally:
        metrics.shutdown()
