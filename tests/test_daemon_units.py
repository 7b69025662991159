"""Unit tests of the daemon's parts: config, settle logic, FITS completeness, ledger transitions,
scheduler admission and cascade, quarantine, status, metrics/health."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from calstream.daemon.config import ConfigError, load_config, parse_bytes
from calstream.daemon.intake import exposure_name, exposure_output_dir, name_stem
from calstream.daemon.ledger import ExposureInfo, JobSpec, Ledger, Member, NewProduct
from calstream.daemon.metrics import Metrics
from calstream.daemon.quarantine import quarantine_file
from calstream.daemon.scheduler import STAGE2_PIPELINES, Scheduler, estimate_job_bytes
from calstream.daemon.sources import Arrival, FolderSource, SettleTracker, fits_expected_size, input_kind
from calstream.daemon.status import render_status

GIB = 1 << 30


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------

def test_config_file_then_flags(tmp_path):
    (tmp_path / "calstream.toml").write_text(
        '[daemon]\ninbox = ["in1", "/abs/in2"]\nworkers = 3\nmemory_budget = "2G"\nmetrics_port = "off"\n'
        '[crds]\npath = "cache"\ncontext = "jwst_0002.pmap"\n[kafka]\ntopic = "arrivals"\n')
    cfg = load_config(tmp_path / "calstream.toml", {"workers": 1, "settle_seconds": "0.5"})
    assert cfg.inboxes == [tmp_path / "in1", Path("/abs/in2")]
    assert cfg.workers == 1 and cfg.settle_seconds == 0.5          # the flag wins
    assert cfg.memory_budget == 2 * GIB and cfg.metrics_port is None
    assert cfg.crds_path == tmp_path / "cache" and cfg.crds_context == "jwst_0002.pmap"
    assert cfg.section("kafka") == {"topic": "arrivals"} and cfg.section("absent") == {}
    assert cfg.output_dir.is_absolute() and cfg.ledger.is_absolute()


@pytest.mark.parametrize("text, problem", [
    ("[daemon]\nworkrs = 2\n", "unknown setting 'workrs'"),
    ("[daemon]\nworkers = 0\n", "workers must be at least 1"),
    ("[daemon]\nworkers = 'two'\n", "setting workers"),
    ("[daemon]\ninbox = 'x'\noutput_dir = 'x/out'\n", "must not be inside the inbox"),
])
def test_config_errors_name_the_setting(tmp_path, text, problem):
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load_config(tmp_path / "c.toml")


def test_parse_bytes():
    assert parse_bytes("512M") == 512 << 20 and parse_bytes("1.5GiB") == 3 << 29 and parse_bytes(1000) == 1000
    with pytest.raises(ConfigError):
        parse_bytes("lots")


# ---------------------------------------------------------------------------------------------
# names, completeness, settling
# ---------------------------------------------------------------------------------------------

def test_input_kind_ignores_temporary_names():
    assert input_kind("jw01_uncal.fits") == "uncal" and input_kind("x_asn.json") == "asn"
    for name in (".jw01_uncal.fits.Ab12.part", "jw01_uncal.fits.tmp", "jw01_uncal.fits~", "jw01_rate.fits",
                 "jw01_uncal.fits.crdownload", "notes.txt"):
        assert input_kind(name) is None, name


def test_names_and_output_tree(tmp_path):
    assert name_stem("jw01234001001_02101_00001-seg002_nrca1_cal.fits") == "jw01234001001_02101_00001-seg002_nrca1"
    assert exposure_name("jw01234001001_02101_00001-seg002_nrca1") == ("jw01234001001_02101_00001_nrca1", 2)
    assert exposure_name("jw01234001001_02101_00001_nrca1") == ("jw01234001001_02101_00001_nrca1", None)
    assert exposure_output_dir(tmp_path, "jw01234001001_02101_00001-seg002_nrca1") == \
        tmp_path / "jw01234" / "jw01234001001_02101_00001_nrca1"


def _small_fits(path: Path) -> int:
    hdul = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((3, 50, 40), np.uint16), name="SCI")])
    hdul.writeto(path)
    return path.stat().st_size


def test_fits_expected_size(tmp_path):
    size = _small_fits(tmp_path / "a.fits")
    assert fits_expected_size(tmp_path / "a.fits") == ("complete", size)
    data = (tmp_path / "a.fits").read_bytes()
    (tmp_path / "b.fits").write_bytes(data[: size - 100])           # cut inside the data unit
    assert fits_expected_size(tmp_path / "b.fits")[0] == "partial"
    (tmp_path / "c.fits").write_bytes(data[:4000])                   # cut inside the SCI header
    assert fits_expected_size(tmp_path / "c.fits")[0] == "partial"
    (tmp_path / "d.fits").write_bytes(b"hello, this is not FITS" * 200)
    assert fits_expected_size(tmp_path / "d.fits")[0] == "corrupt"


def test_settle_tracker_needs_unchanged_size_and_mtime():
    tracker = SettleTracker(settle_seconds=2.0)
    p = Path("/x_uncal.fits")
    tracker.observe(p, 100, 1, now=0.0)
    tracker.observe(p, 100, 1, now=1.5)
    assert tracker.due(now=1.9) == []
    tracker.observe(p, 200, 2, now=1.9)                              # still growing: clock restarts
    assert tracker.due(now=3.8) == [] and tracker.settled_for(p, 3.8) == pytest.approx(1.9)
    assert tracker.due(now=3.9) == [p]
    tracker.forget(p)
    assert tracker.due(now=100.0) == [] and len(tracker) == 0


def test_folder_source_polling_submits_once_when_settled(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    got: list[Arrival] = []
    source = FolderSource(inbox, settle_seconds=0.3, rescan_seconds=3600, polling=True)
    source._submit = got.append                                      # exercise the settle path only
    path = inbox / "jw01_uncal.fits"
    _small_fits(path)
    assert source.consider(path, closed=True) == 0                   # polling: a close proves nothing
    time.sleep(0.35)
    assert source.consider(path, closed=False) == 1
    assert source.consider(path, closed=False) == 0                  # same size+mtime: once only
    assert [(a.path, a.kind, a.origin) for a in got] == [(path, "uncal", f"folder:{inbox.resolve()}")]


def test_folder_source_inotify_waits_for_complete_content(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    got: list[Arrival] = []
    source = FolderSource(inbox, settle_seconds=5.0, rescan_seconds=3600, abandon_seconds=60)
    source._submit = got.append
    full = tmp_path / "full.fits"
    size = _small_fits(full)
    path = inbox / "jw02_uncal.fits"
    path.write_bytes(full.read_bytes()[: size // 2])                 # a writer closed half-way
    assert source.consider(path, closed=True) == 0
    path.write_bytes(full.read_bytes())
    assert source.consider(path, closed=True) == 1                   # complete: no settle wait
    assert len(got) == 1


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_folder_source_watches_and_rescans(tmp_path, polling):
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    early = inbox / "jw00_uncal.fits"
    _small_fits(early)                                               # arrived while the daemon was down
    got: list[Arrival] = []
    source = FolderSource(inbox, settle_seconds=0.2, rescan_seconds=0.5, polling=polling)
    source.start(got.append)
    try:
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        late = inbox / "sub" / "jw01_uncal.fits"
        tmp = inbox / "sub" / ".jw01_uncal.fits.part"                 # written under a temporary name
        _small_fits(tmp)
        os.replace(tmp, late)
        (inbox / "notes.txt").write_text("ignored")
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.7)                                              # a periodic rescan passes
    finally:
        source.stop()
    assert [a.path for a in got] == [early, late]


# ---------------------------------------------------------------------------------------------
# ledger
# ---------------------------------------------------------------------------------------------

def _exposure(ledger: Ledger, stem: str, exp_type: str = "NRC_IMAGE", shape=(1, 5, 160, 160), **kw) -> int:
    name, segment = exposure_name(stem)
    input_id = ledger.add_input(f"/in/{stem}_uncal.fits", "uncal", origin="test", checksum=f"sha256:{stem}",
                                size=1, mtime_ns=1)
    info = ExposureInfo(f"/in/{stem}_uncal.fits", stem, name, segment, kw.get("segment_total", 1), "NIRCAM",
                        "NRCA1", exp_type, shape, 1, {"META.INSTRUMENT.DETECTOR": "NRCA1"},
                        {"detector1": "calwebb_detector1"}, {"detector1": ["gain"]}, f"/out/{name}")
    return ledger.add_exposure(input_id, info)


def _run(ledger: Ledger, job_id: int, products=(), context="jwst_0001.pmap", refs=None) -> None:
    ledger.mark_running(job_id, 4242)
    ledger.finish_job(job_id, "done", products=[NewProduct(p, k) for k, p in products], context=context,
                      references=refs or {"gain": "g1.fits"}, cal_ver="0.1")


def test_ledger_job_transitions(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    e = _exposure(ledger, "jw01_00001_nrca1")
    job = ledger.enqueue(JobSpec.exposure(e, "detector1"), lane="live")
    assert ledger.enqueue(JobSpec.exposure(e, "detector1"), lane="live") == job          # idempotent
    ledger.mark_running(job, 99)
    assert ledger.job(job).state == "running" and ledger.job(job).tries == 1
    ledger.retry_job(job, delay=30, error_class="OSError", error_message="disk hiccup")
    assert ledger.job(job).state == "queued" and ledger.queued_jobs() == []              # backing off
    assert [j.id for j in ledger.queued_jobs(now=time.time() + 31)] == [job]
    ledger.mark_running(job, 99)
    assert ledger.recover() == 1 and ledger.job(job).state == "queued"                   # dead daemon
    _run(ledger, job, [("rate", "/out/a_rate.fits")])
    assert ledger.finish_job(job, "failed") == []                                         # terminal stays
    assert ledger.job(job).state == "done" and ledger.job(job).tries == 3
    ledger.close()


def test_ledger_keeps_every_product_version(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    e = _exposure(ledger, "jw01_00001_nrca1")
    _run(ledger, ledger.enqueue(JobSpec.exposure(e, "detector1"), lane="live"), [("rate", "/out/a_rate.fits")])
    _run(ledger, ledger.enqueue(JobSpec.exposure(e, "detector1", context="jwst_0002.pmap")),
         [("rate", "/out/a_rate.fits")], context="jwst_0002.pmap", refs={"gain": "g2.fits"})
    versions = ledger.product_versions("/out/a_rate.fits")
    assert [(v.version, v.current, v.crds_context) for v in versions] == [
        (1, False, "jwst_0001.pmap"), (2, True, "jwst_0002.pmap")]
    ledger.set_product_path(versions[0].id, "/out/history/jwst_0001/a_rate.fits")
    assert ledger.product_versions("/out/a_rate.fits")[0].path.startswith("/out/history")
    record, = ledger.exposures_for_reprocessing()
    assert record.crds_parameters == {"META.INSTRUMENT.DETECTOR": "NRCA1"}
    assert record.stages["detector1"].context == "jwst_0002.pmap"
    assert record.stages["detector1"].references == {"gain": "g2.fits"}
    ledger.close()


def test_ledger_lanes_and_contexts(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    a, b = _exposure(ledger, "jw01_00001_nrca1"), _exposure(ledger, "jw01_00002_nrca1")
    old = ledger.enqueue(JobSpec.exposure(a, "image2"))                                   # reprocess lane
    live = ledger.enqueue(JobSpec.exposure(b, "detector1"), lane="live")
    assert [j.id for j in ledger.queued_jobs()] == [live, old]                            # live first
    assert ledger.enqueue(JobSpec.exposure(a, "image2"), lane="live") == old               # promoted
    assert ledger.job(old).lane == "live"
    assert ledger.record_context("jwst_0001.pmap", "worker") is True
    assert ledger.record_context("jwst_0001.pmap", "worker") is False
    assert ledger.record_context("jwst_0002.pmap", "kafka") is True and ledger.active_context() == "jwst_0002.pmap"
    assert [c["active"] for c in ledger.contexts()] == [0, 1]
    ledger.close()


def test_ledger_readonly_sees_a_writer(tmp_path):
    writer = Ledger(tmp_path / "l.sqlite")
    _exposure(writer, "jw01_00001_nrca1")
    reader = Ledger(tmp_path / "l.sqlite", readonly=True)
    assert reader.input_counts() == {"accepted": 1}
    with pytest.raises(Exception):
        reader.add_request("force", "x")
    reader.close()
    writer.close()


# ---------------------------------------------------------------------------------------------
# scheduler
# ---------------------------------------------------------------------------------------------

def test_stage2_pipelines_match_image2():
    from calstream.steps.image2 import IMAGING_EXP_TYPES

    assert set(STAGE2_PIPELINES) == set(IMAGING_EXP_TYPES)


def test_memory_estimate_grows_with_the_data():
    small, big = (1, 5, 160, 160), (1, 10, 2048, 2048)
    assert estimate_job_bytes("detector1", small) < estimate_job_bytes("detector1", big)
    assert estimate_job_bytes("detector1", (2, 10, 2048, 2048)) > estimate_job_bytes("detector1", big)
    assert 100 << 20 < estimate_job_bytes("detector1", big) < 1 << 30                    # ~ measured 412 MB
    assert estimate_job_bytes("image3", big, n_members=8) > estimate_job_bytes("image3", big, n_members=2)


def test_admission_by_workers_memory_and_lane(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    big = [_exposure(ledger, f"jw01_0000{i}_nrca1", shape=(1, 10, 2048, 2048)) for i in range(3)]
    small = _exposure(ledger, "jw01_00009_nrca1")
    for e in big:
        ledger.enqueue(JobSpec.exposure(e, "detector1"), lane="live")
    ledger.enqueue(JobSpec.exposure(small, "detector1"))                                  # reprocess lane
    need = estimate_job_bytes("detector1", (1, 10, 2048, 2048))
    sched = Scheduler(ledger, workers=4, memory_budget=int(need * 1.5), stuck_after=60)
    picked = sched.next_jobs(free_workers=4, reserved_bytes=0, running=0)
    # one big job fits the budget, the second does not; the small reprocess job may not jump ahead
    # of the waiting live job (it would keep it waiting for ever), a small live one may
    assert [j.subject_id for j, _ in picked] == [big[0]]
    assert sched.next_jobs(free_workers=1, reserved_bytes=need, running=1) == []
    small_live = _exposure(ledger, "jw01_00008_nrca1")
    ledger.enqueue(JobSpec.exposure(small_live, "detector1"), lane="live")
    assert [j.subject_id for j, _ in sched.next_jobs(4, 0, running=0)] == [big[0], small_live]
    tiny = Scheduler(ledger, workers=4, memory_budget=1, stuck_after=60)
    assert [j.subject_id for j, _ in tiny.next_jobs(4, 0, running=0)] == [big[0]]          # alone if too big
    assert tiny.next_jobs(4, 10, running=1) == []
    assert sched.next_jobs(0, 0, running=0) == []
    sched.update_load(backlog=3, reserved_bytes=0)
    assert sched.has_capacity()
    sched.update_load(backlog=4, reserved_bytes=0)
    assert not sched.has_capacity()
    ledger.close()


def test_cascade_skips_stage2_loudly_for_other_exp_types(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    sched = Scheduler(ledger, workers=1, memory_budget=GIB, stuck_after=60)
    e = _exposure(ledger, "jw01_00001_nrca1", exp_type="NRC_TSGRISM")
    job = sched.exposure_arrived(e)
    _run(ledger, job, [("rate", "/o/r.fits")])
    sched.after_job(ledger.job(job))
    image2, = ledger.jobs_for("exposure", e, "image2")
    assert image2.state == "skipped" and "NRC_TSGRISM" in image2.error_message
    ledger.close()


def _asn(ledger: Ledger, asn_id: str, stems: list[str], deadline: float) -> int:
    members = [Member(f"{s}_cal.fits", "science", s) for s in stems]
    return ledger.upsert_association(asn_id, input_id=None, path=f"/in/{asn_id}_asn.json", asn_type="image3",
                                     asn_rule="DMS_Level3_Base", product_name=f"p_{asn_id}", members=members,
                                     deadline=deadline, output_dir="/out/p")


def _calibrate(ledger: Ledger, sched: Scheduler, exposure_id: int) -> None:
    for stage, kind in (("detector1", "rate"), ("image2", "cal")):
        job, = [j for j in ledger.jobs_for("exposure", exposure_id, stage) if j.state == "queued"] or \
            [ledger.job(ledger.enqueue(JobSpec.exposure(exposure_id, stage), lane="live"))]
        _run(ledger, job.id, [(kind, f"/o/{exposure_id}_{kind}.fits")])
        sched.after_job(ledger.job(job.id))


def test_association_members_before_and_after_the_asn(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    sched = Scheduler(ledger, workers=1, memory_budget=GIB, stuck_after=60)
    first = _exposure(ledger, "jw01_00001_nrca1")
    _calibrate(ledger, sched, first)                                  # member before the asn
    aid = _asn(ledger, "a1", ["jw01_00001_nrca1", "jw01_00002-seg001_nrca1", "jw01_00002-seg002_nrca1"],
               deadline=time.time() + 60)
    assert sched.refresh(ledger.association(aid)) is None
    assert ledger.association(aid).state == "waiting"
    seg1 = _exposure(ledger, "jw01_00002-seg001_nrca1", segment_total=2)
    sched.exposure_arrived(seg1)
    _calibrate(ledger, sched, seg1)
    assert ledger.association(aid).state == "waiting" and ledger.jobs_for("association", aid) == []
    seg2 = _exposure(ledger, "jw01_00002-seg002_nrca1", segment_total=2)
    sched.exposure_arrived(seg2)
    _calibrate(ledger, sched, seg2)                                   # the last member completes it
    assert ledger.association(aid).state == "ready"
    job, = ledger.jobs_for("association", aid)
    assert job.stage == "image3" and job.state == "queued"
    assert len(sched.readiness(ledger.association(aid)).cal_products) == 3
    ledger.close()


def test_whole_exposure_member_waits_for_every_segment(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    sched = Scheduler(ledger, workers=1, memory_budget=GIB, stuck_after=60)
    aid = _asn(ledger, "a2", ["jw01_00003_nrca1"], deadline=time.time() + 60)
    seg1 = _exposure(ledger, "jw01_00003-seg001_nrca1", segment_total=2)
    _calibrate(ledger, sched, seg1)
    assert sched.readiness(ledger.association(aid)).missing == ("jw01_00003_nrca1_cal.fits",)
    seg2 = _exposure(ledger, "jw01_00003-seg002_nrca1", segment_total=2)
    _calibrate(ledger, sched, seg2)
    assert ledger.association(aid).state == "ready"
    ledger.close()


def test_stuck_association_and_force(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    sched = Scheduler(ledger, workers=1, memory_budget=GIB, stuck_after=60)
    have = _exposure(ledger, "jw01_00001_nrca1")
    _calibrate(ledger, sched, have)
    aid = _asn(ledger, "a3", ["jw01_00001_nrca1", "jw01_00009_nrca1"], deadline=time.time() + 5)
    assert sched.check_stuck(now=time.time()) == []
    stuck, = sched.check_stuck(now=time.time() + 6)
    assert stuck.state == "stuck" and "jw01_00009_nrca1_cal.fits" in stuck.note
    with pytest.raises(LookupError):
        sched.force("nope")
    message = sched.force("a3")
    assert "forced with 1 cal products" in message and ledger.association(aid).forced
    assert ledger.association(aid).state == "ready"
    assert sched.force("a3").endswith("already ready")
    ledger.close()


# ---------------------------------------------------------------------------------------------
# quarantine, status, metrics
# ---------------------------------------------------------------------------------------------

def test_failed_content_can_be_delivered_again_and_a_stem_counts_once(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    args = dict(origin="test", checksum="sha256:abc", size=1, mtime_ns=1)
    bad = ledger.add_input("/in/a_uncal.fits", "uncal", state="quarantined", **args)
    ledger.add_input("/in/b_uncal.fits", "uncal", state="failed", **args)
    assert ledger.find_input_by_checksum("sha256:abc") is None          # may be tried again
    good = ledger.add_input("/in/c_uncal.fits", "uncal", **args)
    assert ledger.find_input_by_checksum("sha256:abc").id == good != bad
    first = _exposure(ledger, "jw01_00001_nrca1")
    again = _exposure(ledger, "jw01_00001_nrca1")                        # the same name delivered again
    other = _exposure(ledger, "jw01_00002_nrca1")
    assert [r.exposure_id for r in ledger.exposures_for_reprocessing()] == [again, other] != [first]
    ledger.close()


def test_quarantine_moves_and_explains(tmp_path):
    bad = tmp_path / "inbox" / "jw_bad_uncal.fits"
    bad.parent.mkdir()
    for attempt in range(2):
        bad.write_text("garbage")
        target = quarantine_file(bad, tmp_path / "q", stage="intake", error_class="InputError",
                                 message=f"not FITS {attempt}")
        assert not bad.exists() and target.read_text() == "garbage"
        report = json.loads(Path(f"{target}.error.json").read_text())
        assert report["message"] == f"not FITS {attempt}" and report["stage"] == "intake"
        assert set(report) >= {"file", "stage", "error_class", "message", "time", "traceback"}
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == [
        "jw_bad_uncal.fits", "jw_bad_uncal.fits.1", "jw_bad_uncal.fits.1.error.json",
        "jw_bad_uncal.fits.error.json"]


def test_quarantine_across_file_systems_and_without_permission(tmp_path, monkeypatch):
    """Another file system: copied under a temporary name, renamed, the source removed. No
    permission to move the input: nothing copied, no error file left, the error raised (the
    daemon retries later)."""
    import errno

    from calstream.daemon import quarantine as q

    bad = tmp_path / "inbox" / "jw_bad_uncal.fits"
    bad.parent.mkdir()
    bad.write_text("garbage")
    real_replace = os.replace

    def cross_device(src, dst):
        if Path(src) == bad:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst)

    monkeypatch.setattr(q.os, "replace", cross_device)
    target = quarantine_file(bad, tmp_path / "q", stage="intake", error_class="InputError", message="m")
    assert not bad.exists() and target.read_text() == "garbage"
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == [target.name, target.name + ".error.json"]

    bad.write_text("garbage")

    def forbidden(src, dst):
        if Path(src) == bad:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_replace(src, dst)

    monkeypatch.setattr(q.os, "replace", forbidden)
    with pytest.raises(PermissionError):
        quarantine_file(bad, tmp_path / "q", stage="intake", error_class="InputError", message="m")
    assert bad.exists() and len(list((tmp_path / "q").iterdir())) == 2


def test_status_tables(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    sched = Scheduler(ledger, workers=1, memory_budget=GIB, stuck_after=60)
    e = _exposure(ledger, "jw01_00001_nrca1")
    sched.exposure_arrived(e)
    _asn(ledger, "a9", ["jw01_00007_nrca1"], deadline=0)
    sched.check_stuck()
    ledger.add_error("InputError", "x: not a FITS file", stage="intake", path="/in/x_uncal.fits",
                     outcome="quarantined")
    text = render_status(Ledger(tmp_path / "l.sqlite", readonly=True))
    assert "live       1" in text and "detector1  1" in text
    assert "a9" in text and "stuck" in text and "x_uncal.fits" in text and "not a FITS file" in text
    ledger.close()


def test_metrics_and_health_endpoints():
    metrics = Metrics()
    port = metrics.serve("127.0.0.1", 0)
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz")
        assert info.value.code == 503                                     # starting: not ready
        metrics.set_phase("running")
        metrics.set_degraded("kafka broker unreachable")
        body = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz"))
        assert body == {"status": "degraded", "reasons": ["kafka broker unreachable"]}
        metrics.clear_degraded("kafka broker unreachable")
        metrics.set_counts({"queued": 2}, {"live": 2}, {"stuck": 1})
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert 'calstream_queue_depth{lane="live"} 2.0' in text and "calstream_health 1.0" in text
        assert 'calstream_associations{state="stuck"} 1.0' in text
    finally:
        metrics.shutdown()


# ---------------------------------------------------------------------------------------------
# worker pool bookkeeping (processes replaced by stand-ins)
# ---------------------------------------------------------------------------------------------

class _FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid, self.alive, self.killed = pid, True, False

    def is_alive(self) -> bool:
        return self.alive

    def kill(self) -> None:
        self.killed, self.alive = True, False


class _FakeConn:
    def __init__(self) -> None:
        self.sent: list = []

    def send(self, message) -> None:
        self.sent.append(message)


def _fake_pool(size: int, recycle_after: int):
    from calstream.daemon.workers import Worker, WorkerPool

    pool = WorkerPool(size, lambda message: None, recycle_after=recycle_after)

    def spawn() -> Worker:
        pool._serial += 1
        worker = Worker(pool._serial, _FakeProcess(1000 + pool._serial), _FakeConn())
        pool._workers[worker.serial] = worker
        return worker

    pool._spawn = spawn
    return pool


def test_pool_recycles_after_n_jobs_and_kills_overdue():
    pool = _fake_pool(size=2, recycle_after=2)
    pool.start()
    first = pool.idle()[0]
    for job in (1, 2):
        pool.on_ready(first.serial)
        pool.assign(first, job, {"job_id": job})
        assert pool.on_result(first.serial) == job
    assert first.retiring and first.tasks.sent[-1] is None            # told to leave after 2 jobs
    assert len(pool._live()) == 2 and first not in pool.idle()        # replacement already started
    assert pool.on_exit(first.serial, 0) == (None, "retired")
    assert len(pool._workers) == 2                                     # no extra spawn for a retiree
    busy = pool.idle()[0]
    pool.assign(busy, 7, {"job_id": 7})
    busy.started -= 10
    assert pool.kill_overdue(timeout=5) == [7] and busy.process.killed
    job, reason = pool.on_exit(busy.serial, -9)
    assert job == 7 and reason.startswith("JobTimeout") and len(pool._workers) == 2


def test_pool_backs_off_when_workers_die_while_starting():
    pool = _fake_pool(size=1, recycle_after=50)
    pool.start()
    worker, = pool.idle()
    assert pool.on_exit(worker.serial, 1) == (None, "worker process ended (exit code 1)")
    assert pool.start_failures == 1 and pool._workers == {}            # not respawned at once
    pool.maintain()
    assert pool._workers == {}
    pool._respawn_at = 0.0                                             # the back-off has passed
    pool.maintain()
    assert len(pool._workers) == 1
    pool.on_ready(next(iter(pool._workers)))
    pool.on_exit(next(iter(pool._workers)), -9)                        # a ready worker died: respawn now
    assert pool.start_failures == 0 and len(pool._workers) == 1


def test_restart_removes_what_killed_writers_left(tmp_path):
    from calstream.daemon.service import remove_partial_files

    folder = tmp_path / "out" / "jw01"
    folder.mkdir(parents=True)
    (folder / ".x_rate.fits.abc.part").write_bytes(b"half")                 # atomic_output's temporary
    (folder / ".x_cal.k3j.part").mkdir()                                     # save_model's temporary folder
    (folder / ".x_cal.k3j.part" / "x_cal.fits").write_bytes(b"half")
    (folder / "x_rate.fits").write_bytes(b"whole")
    assert remove_partial_files(tmp_path / "out") == 2
    assert [p.name for p in folder.iterdir()] == ["x_rate.fits"]
