"""End-to-end: the real ``calstream daemon`` process on temporary folders and real SUB160 files.

One generated observation is shared by the module: three dithered NRCA1 SUB160 exposures, one
exposure in two segments, and their image3 association.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pytest
from astropy.io import fits

from calstream.daemon.ledger import Ledger
from calstream.daemon.sources import fits_expected_size

PROGRAM = "jw01234"
IMAGE3_AVAILABLE = importlib.util.find_spec("calstream.steps.image3") is not None


@pytest.fixture(scope="module")
def observation(crds_cache, tmp_path_factory):
    """{"exposures": [3 uncal paths], "segments": [seg001, seg002], "asn": asn path, "crds": root}."""
    from calstream.steps.synth import generate_observation

    out = tmp_path_factory.mktemp("daemon_obs")
    field = generate_observation(out, crds_cache.root, detectors=("NRCA1",), subarray="SUB160", ngroups=5,
                                 n_exposures=3, seed=0, write_truth=False, via_datamodels=False)
    segmented = generate_observation(out, crds_cache.root, detectors=("NRCA1",), subarray="SUB160", ngroups=5,
                                     nints=2, nsegments=2, seed=0, observation=2, write_truth=False,
                                     via_datamodels=False)
    exposures, segments = field.uncal_paths, segmented.uncal_paths
    asn = out / "jw01234-o001_image3_asn.json"
    write_asn(asn, "o001", [*exposures, *segments])
    return {"exposures": exposures, "segments": segments, "asn": asn, "crds": Path(crds_cache.root)}


def write_asn(path: Path, asn_id: str, uncals: list[Path]) -> None:
    members = [{"expname": p.name.replace("_uncal.fits", "_cal.fits"), "exptype": "science"} for p in uncals]
    path.write_text(json.dumps({"asn_type": "image3", "asn_rule": "DMS_Level3_Base", "asn_id": asn_id,
                                "program": "01234", "asn_pool": "test", "target": "1",
                                "products": [{"name": f"jw01234-{asn_id}_t001_nircam_clear-f200w",
                                              "members": members}]}))


@pytest.fixture(autouse=True)
def _no_daemon_left_behind():
    """A failing test must not leave its daemon running."""
    yield
    for daemon in DaemonProcess.started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(30)
    DaemonProcess.started.clear()


class DaemonProcess:
    """A ``calstream daemon`` subprocess on folders under ``root``."""

    started: list["DaemonProcess"] = []

    def __init__(self, root: Path, crds: Path, *flags: str) -> None:
        DaemonProcess.started.append(self)
        self.root, self.crds, self.flags = root, crds, flags
        self.inbox, self.out, self.quarantine = root / "inbox", root / "products", root / "quarantine"
        self.ledger_path = root / "ledger.sqlite"
        self.log = root / "daemon.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self, workers: int = 2, wait_ready: bool = True) -> "DaemonProcess":
        self.inbox.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "CRDS_SERVER_URL": "https://crds-serverless-mode.stsci.edu"}
        cmd = [sys.executable, "-m", "calstream.daemon.cli", "--log-json", "daemon", "--inbox", str(self.inbox),
               "--output-dir", str(self.out), "--ledger", str(self.ledger_path), "--quarantine",
               str(self.quarantine), "--crds-path", str(self.crds), "--workers", str(workers),
               "--metrics-port", "0", "--settle-seconds", "0.3", *self.flags]
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.port = int(self.wait_log("metrics and health endpoint", 30)["url"].rsplit(":", 1)[1].split("/")[0])
        if wait_ready:
            self.wait_metric(f"calstream_workers {float(workers)}", 60)      # workers warm
        return self

    def log_events(self) -> list[dict]:
        with open(self.log, "rb") as fh:
            fh.seek(self.offset)
            lines = fh.read().decode(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def wait_log(self, event: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.log_events():
                if entry.get("event") == event:
                    return entry
            self._alive()
            time.sleep(0.1)
        raise AssertionError(f"no '{event}' in the daemon log:\n{self.tail()}")

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_metric(self, line: str, timeout: float) -> None:
        self.wait(lambda _: line in self.http("/metrics")[1], timeout, line)

    def wait(self, predicate: Callable[[Ledger], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._alive()
            if self.ledger_path.exists():
                ledger = Ledger(self.ledger_path, readonly=True)
                try:
                    if predicate(ledger):
                        return
                except Exception:           # the schema may not exist yet
                    pass
                finally:
                    ledger.close()
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}\n{self.tail()}")

    def _alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def drop(self, source: Path, name: str | None = None) -> Path:
        """Copy like ``cp``: open, write, close in the inbox."""
        target = self.inbox / (name or source.name)
        shutil.copyfile(source, target)
        return target

    def ledger(self) -> Ledger:
        return Ledger(self.ledger_path, readonly=True)


def input_state(name: str) -> Callable[[Ledger], str | None]:
    def state(ledger: Ledger) -> str | None:
        rows = [r for r in ledger._all("SELECT path, state FROM inputs WHERE state != 'duplicate' ORDER BY id")
                if Path(r["path"]).name == name]
        return rows[0]["state"] if rows else None
    return state


def visible_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def assert_complete_products(root: Path) -> None:
    """Every visible FITS product is whole (as long as its headers declare) and opens."""
    assert not [p for p in root.rglob(".*.part")], "temporary files left behind"
    for path in visible_files(root):
        if path.suffix == ".fits":
            assert fits_expected_size(path)[0] == "complete", path
            with fits.open(path) as hdul:
                assert hdul[0].header["CAL_VER"]


def products_by_exposure(ledger: Ledger) -> dict[str, list[str]]:
    rows = ledger._all("SELECT e.stem, p.kind, p.version FROM products p JOIN exposures e ON e.id = p.exposure_id"
                       " ORDER BY e.stem, p.kind")
    out: dict[str, list[str]] = {}
    for row in rows:
        out.setdefault(row["stem"], []).append(f"{row['kind']}v{row['version']}")
    return out


# ---------------------------------------------------------------------------------------------
# 1. an observation arriving in any order, with a slow writer, duplicates and a corrupt file
# ---------------------------------------------------------------------------------------------

def slow_copy(source: Path, target: Path, seconds: float) -> None:
    """A writer that closes half-way, then appends the rest in pieces over ``seconds``."""
    data = source.read_bytes()
    half = len(data) // 2
    target.write_bytes(data[:half])                       # first close: an incomplete FITS file
    pieces = 4
    step = -(-(len(data) - half) // pieces)
    for i in range(pieces):
        time.sleep(seconds / pieces)
        with open(target, "ab") as fh:
            fh.write(data[half + i * step: half + (i + 1) * step])


def test_observation_in_any_order(observation, tmp_path):
    exp1, exp2, exp3 = observation["exposures"]
    seg1, seg2 = observation["segments"]
    d = DaemonProcess(tmp_path, observation["crds"], "--stuck-after", "600").start(workers=2)
    try:
        d.drop(observation["asn"])                                             # the asn first
        d.drop(seg2)                                                           # segments out of order
        corrupt = d.inbox / "jw01234001001_02101_00007_nrca1_uncal.fits"
        corrupt.write_text("SIMPLE? no: this is a text file that claims to be an exposure\n" * 50)
        d.drop(exp1)
        slow_copy(exp2, d.inbox / exp2.name, seconds=2.0)
        d.drop(exp3)
        d.wait(lambda lg: input_state(exp1.name)(lg) == "done", 60, "exposure 1 done")
        d.drop(exp1, "jw01234001001_02101_00011_nrca1_uncal.fits")            # same content, other name
        tmp = d.inbox / f".{exp1.name}.part"
        shutil.copyfile(exp1, tmp)
        os.replace(tmp, d.inbox / exp1.name)                                   # same name dropped again
        d.wait(lambda lg: lg.input_counts().get("duplicate", 0) == 2, 30, "two duplicates recorded")
        d.wait(lambda lg: all(input_state(p.name)(lg) == "done" for p in (exp1, exp2, exp3, seg2)), 60,
               "all but the last member calibrated")
        with d.ledger() as ledger:
            asn, = ledger.associations_in_state("waiting")
            assert ledger.jobs_for("association", asn.id) == []                 # not before its last member
        status = subprocess.run([sys.executable, "-m", "calstream.daemon.cli", "status", "--ledger",
                                 str(d.ledger_path)], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "daemon running" in status.stdout
        assert "waiting" in status.stdout and "o001" in status.stdout and "InputError" in status.stdout
        last_member_dropped = time.time()
        d.drop(seg1)                                                           # the last member
        d.wait(lambda lg: lg.association_by_asn_id("o001").state in ("done", "failed"), 120, "stage 3")
        code, body = d.http("/healthz")
        assert code == 200 and json.loads(body)["status"] == "ok"
        assert 'calstream_jobs{state="done"}' in d.http("/metrics")[1]
    finally:
        code = d.stop(signal.SIGTERM)
    assert code == 0

    ledger = d.ledger()
    stems = [p.name.removesuffix("_uncal.fits") for p in (exp1, exp2, exp3, seg1, seg2)]
    # every exposure: exactly one detector1 and one image2 run, one version of each product
    assert products_by_exposure(ledger) == {s: ["calv1", "ratev1", "rateintsv1"] for s in sorted(stems)}
    assert ledger.stage_counts() == {("detector1", "done"): 5, ("image2", "done"): 5,
                                     ("image3", "done" if IMAGE3_AVAILABLE else "failed"): 1}
    for stem in stems:
        folder = d.out / PROGRAM / stem.replace("-seg001", "").replace("-seg002", "")
        assert (folder / f"{stem}_rate.fits").is_file() and (folder / f"{stem}_cal.fits").is_file()
    assert not (d.out / PROGRAM / "jw01234001001_02101_00011_nrca1").exists()          # duplicate: no work
    # the corrupt file: quarantined with its reason, the others untouched
    report = json.loads((d.quarantine / f"{corrupt.name}.error.json").read_text())
    assert report["error_class"] == "InputError" and "not a FITS file" in report["message"]
    assert (d.quarantine / corrupt.name).is_file() and not corrupt.exists()
    assert [p.name for p in d.quarantine.iterdir()] and ledger.input_counts()["quarantined"] == 1
    # the slow writer: processed once, from the complete file
    exposure2, = [e for e in ledger.exposures_matching(exp2.name.removesuffix("_uncal.fits"))]
    assert exposure2.nbytes == exp2.stat().st_size
    # the association: stage 3 ran once, after its last member
    asn = ledger.association_by_asn_id("o001")
    job, = ledger.jobs_for("association", asn.id)
    assert job.created_at >= last_member_dropped
    if IMAGE3_AVAILABLE:
        assert asn.state == "done"
        kinds = {p.kind for p in ledger.current_products(association_id=asn.id)}
        assert {"i2d", "asn"} <= kinds
        resolved = json.loads(Path(next(p.path for p in ledger.current_products(association_id=asn.id)
                                        if p.kind == "asn")).read_text())
        assert len(resolved["products"][0]["members"]) == 5
    else:
        assert asn.state == "failed" and job.error_class == "StepNotImplementedError"
    assert_complete_products(d.out)
    ledger.close()


# ---------------------------------------------------------------------------------------------
# 2. SIGTERM with work in flight, kill -9 during a job, restart; a stuck association forced
# ---------------------------------------------------------------------------------------------

def running_job(ledger: Ledger) -> bool:
    return ledger.job_counts().get("running", 0) > 0


def test_sigterm_kill9_restart_and_forced_association(observation, tmp_path):
    exp1, exp2, exp3 = observation["exposures"]
    d = DaemonProcess(tmp_path, observation["crds"], "--stuck-after", "3", "--grace-seconds", "60")

    # SIGTERM while a job runs: intake stops, the running job finishes, exit 0; queued work stays queued
    d.start(workers=1)
    d.drop(exp1)
    d.drop(exp2)
    d.wait(lambda lg: running_job(lg) and lg.job_counts().get("queued", 0) > 0, 30, "a job running, one queued")
    assert d.stop(signal.SIGTERM) == 0
    ledger = d.ledger()
    counts = ledger.job_counts()
    assert counts.get("running", 0) == 0 and counts.get("done", 0) >= 1 and counts.get("queued", 0) >= 1
    ledger.close()
    assert_complete_products(d.out)

    # restart: the queued work resumes; kill -9 the daemon in the middle of a job
    d.start(workers=1)
    d.wait(running_job, 30, "a job running after the restart")
    children = subprocess.run(["pgrep", "-P", str(d.proc.pid)], capture_output=True, text=True).stdout.split()
    d.stop(signal.SIGKILL)
    assert children, "the daemon had no worker processes"
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{pid}").exists() for pid in children), "workers outlived the killed daemon"
    # whatever the moment, no partial product is visible (temporary files are hidden dot-files)
    assert all(fits_expected_size(p)[0] == "complete" for p in visible_files(d.out) if p.suffix == ".fits")

    # restart again: everything ends with exactly one complete product set; a stuck association forced
    d.start(workers=2)
    d.drop(exp3)
    stuck_asn = tmp_path / "stuck_asn.json"
    write_asn(stuck_asn, "o009", [exp1, Path("jw01234009001_02101_00001_nrca1_uncal.fits")])
    d.drop(stuck_asn, "jw01234-o009_image3_asn.json")
    d.wait(lambda lg: all(input_state(p.name)(lg) == "done" for p in (exp1, exp2, exp3)), 90, "all exposures done")
    d.wait(lambda lg: lg.association_by_asn_id("o009").state == "stuck", 30, "the association marked stuck")
    status = subprocess.run([sys.executable, "-m", "calstream.daemon.cli", "status", "--ledger", str(d.ledger_path)],
                            capture_output=True, text=True, timeout=60)
    assert "stuck" in status.stdout and "missing: jw01234009001_02101_00001_nrca1_cal.fits" in status.stdout
    forced = subprocess.run([sys.executable, "-m", "calstream.daemon.cli", "force", "o009", "--ledger",
                             str(d.ledger_path)], capture_output=True, text=True, timeout=60)
    assert forced.returncode == 0 and "forced with 1 cal products" in forced.stdout, forced.stdout + forced.stderr
    d.wait(lambda lg: lg.association_by_asn_id("o009").state in ("done", "failed"), 90, "forced stage 3")
    assert d.stop(signal.SIGTERM) == 0

    ledger = d.ledger()
    stems = [p.name.removesuffix("_uncal.fits") for p in (exp1, exp2, exp3)]
    assert products_by_exposure(ledger) == {s: ["calv1", "ratev1", "rateintsv1"] for s in sorted(stems)}
    done = ledger.stage_counts()
    assert done[("detector1", "done")] == 3 and done[("image2", "done")] == 3
    assert ledger.job_counts().get("running", 0) == 0 and ledger.job_counts().get("queued", 0) == 0
    asn = ledger.association_by_asn_id("o009")
    assert asn.forced
    job, = ledger.jobs_for("association", asn.id)
    if IMAGE3_AVAILABLE:
        assert asn.state == "done" and job.state == "done"
    else:
        assert job.error_class == "StepNotImplementedError"
    assert_complete_products(d.out)
    ledger.close()


# ---------------------------------------------------------------------------------------------
# 3. a job over its time limit is killed and retried, then fails visibly
# ---------------------------------------------------------------------------------------------

def test_job_time_limit_kills_and_retries(observation, tmp_path):
    exp1 = observation["exposures"][0]
    d = DaemonProcess(tmp_path, observation["crds"], "--job-timeout", "0.05", "--max-tries", "2")
    d.start(workers=1, wait_ready=False)          # the limit counts from dispatch, warm or not
    try:
        d.drop(exp1)
        d.wait(lambda lg: input_state(exp1.name)(lg) == "failed", 60, "the exposure to fail after 2 tries")
        code, body = d.http("/metrics")
        assert 'calstream_errors_total{error_class="JobTimeout"} 2.0' in body
    finally:
        assert d.stop(signal.SIGTERM) == 0
    with d.ledger() as ledger:
        job, = ledger.jobs_for("exposure", ledger.exposures_matching(exp1.name.removesuffix("_uncal.fits"))[0].id)
        assert (job.stage, job.state, job.tries, job.error_class) == ("detector1", "failed", 2, "JobTimeout")
        outcomes = [e.outcome for e in reversed(ledger.recent_errors())]
        assert outcomes == ["retry", "failed"]
    assert not d.quarantine.exists() or not any(d.quarantine.iterdir())            # not the input's fault
    assert all(fits_expected_size(p)[0] == "complete" for p in visible_files(d.out) if p.suffix == ".fits")
