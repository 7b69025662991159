"""The daemon's own numbers: latency, throughput with 1 vs 2 workers, overhead, idle memory.

Usage: python bench/bench_daemon.py [--workdir bench-output/daemon] [--exposures 20] [--subarray SUB160]

Each run starts a real ``calstream daemon`` on fresh folders, waits until its workers are warm,
calibrates one warm-up exposure per worker, then:

* latency: one exposure dropped (renamed) into the idle inbox at a time; time until its rate
  product is seen in place (polled every 2 ms), against the worker's own time for that job
  (target: latency <= processing + 1 s), and the daemon's part of it: landing -> job dispatched;
* throughput: N exposures dropped at once; time until the last rate (stage 1) and the last cal
  (stages 1+2) exist, with 1 and with 2 workers (target: >= 1.8x on 2 cores for stage 1);
* overhead: CPU time of the daemon's main process per exposure (intake, checksum, headers,
  ledger, dispatch, results, events) during the throughput run (target < 50 ms);
* idle memory: RSS of the main process with no work (target < 300 MB), of each worker, and
  whether numba/llvmlite is mapped into the main process (it must not be).

The machine's load average is printed before and after: the 2-worker ratio means something only
on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def generate(workdir: Path, n: int, subarray: str) -> tuple[list[Path], Path]:
    crds = workdir / "crds_cache"
    os.environ["CRDS_PATH"] = str(crds)
    from calstream.steps.synth import generate_observation

    info = generate_observation(workdir / "data", crds, detectors=("NRCA1",), subarray=subarray, ngroups=10,
                                n_exposures=n, seed=0, write_truth=False, via_datamodels=False)
    return info.uncal_paths, crds


class Daemon:
    def __init__(self, root: Path, crds: Path, workers: int) -> None:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        self.root, self.inbox, self.out = root, root / "inbox", root / "products"
        self.ledger = root / "ledger.sqlite"
        log = open(root / "daemon.log", "wb")
        env = {**os.environ, "CRDS_SERVER_URL": "https://crds-serverless-mode.stsci.edu"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "calstream.daemon.cli", "--log-json", "--log-level", "WARNING", "daemon",
             "--inbox", str(self.inbox), "--output-dir", str(self.out), "--ledger", str(self.ledger),
             "--quarantine", str(root / "quarantine"), "--crds-path", str(crds), "--workers", str(workers),
             "--metrics-port", "0", "--settle-seconds", "0.5"], stdout=log, stderr=subprocess.STDOUT, env=env)
        self.port = self._port()
        self._wait(lambda: f"calstream_workers {float(workers)}" in self.metrics(), 120)

    def _port(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for line in (self.root / "daemon.log").read_text(errors="replace").splitlines():
                if '"metrics and health endpoint"' in line:
                    return int(json.loads(line)["url"].rsplit(":", 1)[1].split("/")[0])
            time.sleep(0.05)
        raise RuntimeError("daemon did not start")

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5).read().decode()

    def _wait(self, predicate, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"timed out; see {self.root / 'daemon.log'}")
            time.sleep(0.05)

    def drop(self, uncal: Path) -> float:
        """Rename a copy into the inbox (lands atomically); returns the landing time."""
        tmp = self.inbox / f".{uncal.name}.part"
        shutil.copyfile(uncal, tmp)
        landed = time.time()
        os.replace(tmp, self.inbox / uncal.name)
        return landed

    def product(self, uncal: Path, suffix: str) -> Path:
        stem = uncal.name.removesuffix("_uncal.fits")
        return self.out / "jw01234" / stem / f"{stem}_{suffix}.fits"

    def wait_products(self, uncals: list[Path], suffix: str, timeout: float = 600) -> float:
        self._wait(lambda: all(self.product(u, suffix).exists() for u in uncals), timeout)
        return time.time()

    def job_seconds(self, uncal: Path, stage: str, column: str = "seconds") -> float:
        """The worker's time for the job (or another jobs column, e.g. started_at)."""
        from calstream.daemon.ledger import Ledger

        stem = uncal.name.removesuffix("_uncal.fits")
        with Ledger(self.ledger, readonly=True) as ledger:
            row = ledger._one(f"SELECT j.{column} FROM jobs j JOIN exposures e ON e.id = j.subject_id"
                              " WHERE j.kind='exposure' AND j.stage=? AND e.stem=? AND j.state='done'", (stage, stem))
        return float(row[0])

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss(self, pid: int | None = None) -> int:
        for line in Path(f"/proc/{pid or self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        return [int(p) for p in out if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]

    def maps_numba(self) -> bool:
        maps = Path(f"/proc/{self.proc.pid}/maps").read_text()
        return "llvmlite" in maps or "/numba/" in maps

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def warm(daemon: Daemon, uncals: list[Path]) -> None:
    for u in uncals:
        daemon.drop(u)
    daemon.wait_products(uncals, "cal")


def throughput(workdir: Path, crds: Path, uncals: list[Path], workers: int) -> dict:
    daemon = Daemon(workdir / f"throughput_{workers}w", crds, workers)
    try:
        warm(daemon, uncals[:2])
        batch = uncals[2:]
        cpu0 = daemon.cpu_seconds()
        t0 = time.time()
        for u in batch:
            daemon.drop(u)
        t_rate = daemon.wait_products(batch, "rate") - t0
        t_cal = daemon.wait_products(batch, "cal") - t0
        cpu = daemon.cpu_seconds() - cpu0
        d1 = [daemon.job_seconds(u, "detector1") for u in batch]
    finally:
        daemon.stop()
    return {"workers": workers, "exposures": len(batch), "stage1_s": t_rate, "stage12_s": t_cal,
            "detector1_job_median_s": statistics.median(d1), "main_cpu_per_exposure_ms": 1000 * cpu / len(batch)}


def latency_and_memory(workdir: Path, crds: Path, uncals: list[Path]) -> dict:
    daemon = Daemon(workdir / "latency", crds, 2)
    try:
        warm(daemon, uncals[:2])
        time.sleep(3)
        idle = {"main_rss_mb": daemon.rss() / 2**20,
                "worker_rss_mb": [round(daemon.rss(p) / 2**20) for p in daemon.worker_pids()],
                "main_maps_numba": daemon.maps_numba()}
        rows = []
        for u in uncals[2:7]:
            landed = daemon.drop(u)
            rate = daemon.product(u, "rate")
            deadline = time.monotonic() + 120
            while not rate.exists() and time.monotonic() < deadline:
                time.sleep(0.002)
            latency = time.time() - landed
            daemon.wait_products([u], "cal")
            rows.append({"latency_s": latency, "processing_s": daemon.job_seconds(u, "detector1"),
                         "to_dispatch_s": daemon.job_seconds(u, "detector1", "started_at") - landed})
            time.sleep(1.0)                     # idle again
    finally:
        daemon.stop()
    over = [r["latency_s"] - r["processing_s"] for r in rows]
    dispatch = [r["to_dispatch_s"] for r in rows]
    return {"idle": idle, "latency": rows,
            "latency_minus_processing_s": {"median": statistics.median(over), "max": max(over)},
            "landing_to_dispatch_s": {"median": statistics.median(dispatch), "max": max(dispatch)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="bench-output/daemon")
    parser.add_argument("--exposures", type=int, default=20)
    parser.add_argument("--subarray", default="SUB160")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    load0 = os.getloadavg()
    uncals, crds = generate(workdir, args.exposures + 2, args.subarray)
    lat = latency_and_memory(workdir, crds, uncals)
    runs = [throughput(workdir, crds, uncals, w) for w in (1, 2)]
    load1 = os.getloadavg()
    result = {"subarray": args.subarray, "load_before": load0, "load_after": load1, **lat, "throughput": runs,
              "speedup_stage1": runs[0]["stage1_s"] / runs[1]["stage1_s"],
              "speedup_stage12": runs[0]["stage12_s"] / runs[1]["stage12_s"]}
    (workdir / "bench_daemon.json").write_text(json.dumps(result, indent=1))
    print(f"machine load average before/after: {load0[0]:.2f} / {load1[0]:.2f} on {os.cpu_count()} cores"
          + ("  (NOT quiet: the worker speed-up is not meaningful)" if max(load0[0], load1[0]) > 0.8 else ""))
    print(f"idle daemon: main RSS {lat['idle']['main_rss_mb']:.0f} MB (target < 300), workers "
          f"{lat['idle']['worker_rss_mb']} MB, numba in the main process: {lat['idle']['main_maps_numba']}")
    for r in lat["latency"]:
        print(f"latency landing -> rate {r['latency_s']:.3f} s, worker processing {r['processing_s']:.3f} s, "
              f"landing -> job dispatched {r['to_dispatch_s']:.3f} s")
    print(f"latency - processing: median {result['latency_minus_processing_s']['median']:.3f} s, "
          f"max {result['latency_minus_processing_s']['max']:.3f} s (target <= 1 s); the daemon's part, landing -> "
          f"dispatch: median {result['landing_to_dispatch_s']['median']:.3f} s, max {result['landing_to_dispatch_s']['max']:.3f} s")
    for r in runs:
        print(f"{r['workers']} worker(s): {r['exposures']} x {args.subarray} stage 1 in {r['stage1_s']:.2f} s, "
              f"stages 1+2 in {r['stage12_s']:.2f} s; detector1 job median {r['detector1_job_median_s']:.3f} s; "
              f"daemon main-process CPU {r['main_cpu_per_exposure_ms']:.1f} ms/exposure (target < 50)")
    print(f"speed-up 2 vs 1 worker: stage 1 {result['speedup_stage1']:.2f}x (target >= 1.8), "
          f"stages 1+2 {result['speedup_stage12']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
