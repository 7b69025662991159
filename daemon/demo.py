"""``calstream demo`` (``make demo``): the streaming daemon on a small generated observation.

Generates a NIRCam observation (a local CRDS cache, three dithered exposures of one field, one more
exposure in two segments, their level-3 association, and one corrupt file), starts ``calstream
daemon`` on a temporary inbox, drops the files in one by one as if they were arriving, shows the
progress as the ledger records it, and finishes when the stage 3 mosaic exists: what was produced,
the quarantined file with its reason, and the timings.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DQ_DO_NOT_USE = 1
ASN_ID = "o001"
STATE_DIRS = ("inbox", "products", "quarantine")


@dataclass
class DemoReport:
    """What the demo produced and how long it took (seconds)."""

    workdir: Path
    rows: list[tuple[str, str, float, float, float, float]] = field(default_factory=list)
    stage3: list[tuple[str, str]] = field(default_factory=list)      # (kind, path)
    stage3_state: str = ""
    stage3_note: str = ""
    stage3_seconds: float = float("nan")
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    timings: dict[str, float] = field(default_factory=dict)


def run_demo(workdir: str | Path, subarray: str = "SUB640", ngroups: int = 6, workers: int | None = None,
             timeout: float = 600.0) -> DemoReport:
    """Run the whole demo under ``workdir``; returns the report (see :func:`print_rows`)."""
    workdir = Path(workdir).resolve()
    started = time.perf_counter()
    for name in STATE_DIRS:
        shutil.rmtree(workdir / name, ignore_errors=True)
    for path in workdir.glob("ledger.sqlite*"):
        path.unlink()
    report = DemoReport(workdir)
    files = generate_inputs(workdir, subarray, ngroups)
    report.timings["generate"] = time.perf_counter() - started
    daemon = _start_daemon(workdir, workers or min(2, os.cpu_count() or 1))
    try:
        report.timings["daemon start"] = time.perf_counter() - started - report.timings["generate"]
        watcher = _Progress(workdir / "ledger.sqlite", t0=time.perf_counter())
        drops_start = time.perf_counter()
        for path in files:
            shutil.copyfile(path, workdir / "inbox" / path.name)
            watcher.say("drop", path.name)
            watcher.poll()
            _sleep_watching(watcher, 0.4)
        last_drop = time.perf_counter()
        deadline = time.monotonic() + timeout
        while not watcher.stage3_finished():
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited ({daemon.returncode}); see {workdir / 'daemon.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no stage 3 product after {timeout:g} s; see {workdir / 'daemon.log'}")
            _sleep_watching(watcher, 0.2)
        report.timings["first drop -> mosaic"] = time.perf_counter() - drops_start
        report.timings["last drop -> mosaic"] = time.perf_counter() - last_drop
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    _fill_report(report, workdir / "ledger.sqlite")
    report.timings["total"] = time.perf_counter() - started
    return report


def generate_inputs(workdir: Path, subarray: str, ngroups: int) -> list[Path]:
    """Uncal files, the association and a corrupt file, in the order they will arrive."""
    from calstream.steps.synth import generate_observation  # noqa: PLC0415

    gen, crds = workdir / "generated", workdir / "crds_cache"
    shutil.rmtree(gen, ignore_errors=True)
    t0 = time.perf_counter()
    print(f"generating a CRDS cache and NIRCam {subarray} exposures in {workdir} ...", flush=True)
    field_ = generate_observation(gen, crds, detectors=("NRCA1",), subarray=subarray, ngroups=ngroups,
                                  n_exposures=3, seed=0, write_truth=False, via_datamodels=False)
    segmented = generate_observation(gen, crds, detectors=("NRCA1",), subarray=subarray, ngroups=ngroups, nints=2,
                                     nsegments=2, seed=0, observation=2, write_truth=False, via_datamodels=False)
    os.environ["CRDS_PATH"] = str(crds)
    exposures, (seg1, seg2) = field_.uncal_paths, segmented.uncal_paths
    asn = gen / f"jw01234-{ASN_ID}_image3_asn.json"
    asn.write_text(json.dumps(_association([*exposures, seg1, seg2]), indent=1))
    corrupt = gen / "jw01234001001_02101_00004_nrca1_uncal.fits"
    corrupt.write_bytes(np.random.default_rng(4).integers(0, 256, 8640, dtype=np.uint8).tobytes())
    print(f"  {len(exposures)} dithered exposures, one exposure in 2 segments, an association and a corrupt "
          f"file in {time.perf_counter() - t0:.1f} s", flush=True)
    return [asn, exposures[0], seg2, corrupt, exposures[1], exposures[2], seg1]


def _association(uncals: list[Path]) -> dict:
    from astropy.io import fits  # noqa: PLC0415

    header = fits.getheader(uncals[0])
    optical = "-".join(str(header.get(k, "clear")).lower() for k in ("PUPIL", "FILTER"))
    members = [{"expname": p.name.replace("_uncal.fits", "_cal.fits"), "exptype": "science"} for p in uncals]
    return {"asn_type": "image3", "asn_rule": "DMS_Level3_Base", "asn_id": ASN_ID, "program": "01234",
            "asn_pool": "demo", "target": "1", "version_id": None,
            "products": [{"name": f"jw01234-{ASN_ID}_t001_nircam_{optical}", "members": members}]}


def _start_daemon(workdir: Path, workers: int) -> subprocess.Popen:
    log_path = workdir / "daemon.log"
    cmd = [sys.executable, "-m", "calstream.daemon.cli", "--log-json", "daemon",
           "--inbox", str(workdir / "inbox"), "--output-dir", str(workdir / "products"),
           "--quarantine", str(workdir / "quarantine"), "--ledger", str(workdir / "ledger.sqlite"),
           "--crds-path", str(workdir / "crds_cache"), "--workers", str(workers), "--settle-seconds", "0.5",
           "--metrics-port", "0"]
    env = {**os.environ, "CRDS_SERVER_URL": os.environ.get("CRDS_SERVER_URL",
                                                           "https://crds-serverless-mode.stsci.edu")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    print(f"starting calstream daemon ({workers} workers; log {log_path}) ...", flush=True)
    port = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log_path.read_text(errors="replace").splitlines():
            if '"metrics and health endpoint"' in line:
                port = int(json.loads(line)["url"].rsplit(":", 1)[1].split("/")[0])
        if port is not None and _workers_ready(port, workers):
            print(f"  ready: pid {proc.pid}, http://127.0.0.1:{port}/metrics and /healthz", flush=True)
            return proc
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the daemon did not start; see {log_path}")


def _workers_ready(port: int, workers: int) -> bool:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return False
    return f"calstream_workers {float(workers)}" in text


def _sleep_watching(watcher: "_Progress", seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(min(0.1, max(0.0, end - time.monotonic())))
        watcher.poll()


class _Progress:
    """Prints what the ledger records, as it happens (read-only; the daemon is the writer)."""

    def __init__(self, ledger_path: Path, t0: float) -> None:
        self.ledger_path, self.t0 = ledger_path, t0
        self.products = self.errors = self.jobs = 0
        self.asn_state = ""
        self.done = False

    def say(self, what: str, text: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {what:12s} {text}", flush=True)

    def poll(self) -> None:
        from .ledger import Ledger  # noqa: PLC0415

        if not self.ledger_path.exists():
            return
        with Ledger(self.ledger_path, readonly=True) as ledger:
            for row in ledger._all("SELECT p.id, p.kind, p.path, j.stage, j.seconds FROM products p JOIN jobs j"
                                   " ON j.id = p.job_id WHERE p.id > ? ORDER BY p.id", (self.products,)):
                self.products = row["id"]
                if not row["kind"].startswith(("rateints", "crf")):
                    self.say(row["kind"], f"{Path(row['path']).name}  ({row['stage']} {row['seconds']:.1f} s)")
            for err in ledger._all("SELECT id, path, error_class, message, outcome FROM errors WHERE id > ?"
                                   " ORDER BY id", (self.errors,)):
                self.errors = err["id"]
                self.say(err["outcome"].upper(), f"{Path(err['path'] or '?').name}: {err['error_class']}")
            asn = ledger.association_by_asn_id(ASN_ID)
            if asn is not None and asn.state != self.asn_state:
                self.asn_state = asn.state
                self.say("association", f"{asn.asn_id} {asn.state}" + (f" ({asn.note})" if asn.note else ""))
                self.done = asn.state in ("done", "failed", "skipped")

    def stage3_finished(self) -> bool:
        self.poll()
        return self.done


def _fill_report(report: DemoReport, ledger_path: Path) -> None:
    from .ledger import Ledger  # noqa: PLC0415

    with Ledger(ledger_path, readonly=True) as ledger:
        for exposure in sorted(ledger.exposures_for_reprocessing(), key=lambda e: e.stem):
            products = {p.kind: p for p in ledger.current_products(exposure_id=exposure.exposure_id)}
            seconds = {j.stage: j.seconds or float("nan") for j in ledger.jobs_for("exposure", exposure.exposure_id)}
            rate, cal = products.get("rate"), products.get("cal")
            report.rows.append((exposure.stem, "x".join(map(str, _shape(rate.path))) if rate else "-",
                                _median(rate.path) if rate else float("nan"), seconds.get("detector1", float("nan")),
                                _median(cal.path) if cal else float("nan"), seconds.get("image2", float("nan"))))
        asn = ledger.association_by_asn_id(ASN_ID)
        if asn is not None:
            report.stage3_state, report.stage3_note = asn.state, asn.note or ""
            report.stage3 = [(p.kind, p.path) for p in ledger.current_products(association_id=asn.id)
                             if not p.kind.startswith("crf")]
            jobs = ledger.jobs_for("association", asn.id)
            if jobs:
                report.stage3_seconds = jobs[-1].seconds or float("nan")
                if jobs[-1].error_message:
                    report.stage3_note = f"{jobs[-1].error_class}: {jobs[-1].error_message}"
        for path in sorted(report.workdir.joinpath("quarantine").glob("*.error.json")):
            info = json.loads(path.read_text())
            report.quarantined.append((Path(info["quarantined_as"]).name, info["message"]))


def _shape(path: str) -> tuple[int, ...]:
    from astropy.io import fits  # noqa: PLC0415

    return tuple(fits.getheader(path, "SCI")[f"NAXIS{n}"] for n in (2, 1))


def _median(path: str) -> float:
    from astropy.io import fits  # noqa: PLC0415

    with fits.open(path) as hdul:
        sci, dq = hdul["SCI"].data, hdul["DQ"].data
    return float(np.nanmedian(sci[(dq & DQ_DO_NOT_USE) == 0]))


def print_rows(report: DemoReport) -> None:
    """The demo's summary: products per exposure, the mosaic, the quarantine, the timings."""
    print()
    print(f"{'exposure (stages 1 and 2)':42s} {'shape':>8s} {'rate DN/s':>10s} {'s':>5s} {'cal MJy/sr':>11s} {'s':>5s}")
    for stem, shape, rate, t1, cal, t2 in report.rows:
        print(f"{stem:42s} {shape:>8s} {rate:10.3f} {t1:5.1f} {cal:11.4f} {t2:5.1f}")
    print(f"\nstage 3 (calwebb_image3, association {ASN_ID}): {report.stage3_state}"
          + (f" in {report.stage3_seconds:.1f} s" if report.stage3_state == "done" else "")
          + (f" — {report.stage3_note}" if report.stage3_state != "done" and report.stage3_note else ""))
    for kind, path in report.stage3:
        print(f"  {kind:5s} {path}")
    print("\nquarantined:")
    for name, reason in report.quarantined or [("(none)", "")]:
        print(f"  {name}: {reason}")
    print("\ntimings: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.timings.items()))


__all__ = ["DemoReport", "generate_inputs", "print_rows", "run_demo"]
