"""CRDS context changes: the affected set, the dry-run report, and re-processing by the real daemon.

Data (generated once for the module): twenty NIRCam SUB160 exposures — two detectors (NRCA1, NRCB1),
two filters (F200W, F150W), two dates (before and after the NRCA1 gain change of 2024-01-01) — in two
image3 associations (one per filter), and a CRDS cache with four contexts:

* jwst_0001 -> jwst_0002: new NRCA1 gain for observations after 2024-01-01 (redo from detector1);
* jwst_0002 -> jwst_0003: new F150W flat on both detectors (redo from image2);
* jwst_0003 -> jwst_0004: a photom rule row that selects the same file (rules change, nothing else).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
from astropy.io import fits

from calstream.daemon.affected import affected_associations, affected_exposures, stage_reftypes
from calstream.daemon.ledger import ExposureRecord, JobSpec, Ledger, Member, NewProduct, StageUse

CTX = [f"jwst_000{i}.pmap" for i in range(1, 5)]
DETECTORS = ("NRCA1", "NRCB1")
FILTERS = {"F200W": 1, "F150W": 2}                     # filter -> observation number (= association)
VISITS = {1: ("2023-11-01T10:00:00.000", 2), 2: ("2024-03-01T12:00:00.000", 3)}   # visit -> (start, n)
IMAGE2_USED = ("area", "distortion", "filteroffset", "flat", "photom")
GAIN = ("gain", "jwst_nircam_gain_0301.fits", "jwst_nircam_gain_5301.fits")
FLAT = {"NRCA1": ("flat", "jwst_nircam_flat_0104.fits", "jwst_nircam_flat_5104.fits"),
        "NRCB1": ("flat", "jwst_nircam_flat_0604.fits", "jwst_nircam_flat_5604.fits")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Uncal files, their facts (detector, filter, visit), two asn files, the CRDS cache root."""
    from calstream.steps.synth import generate_observation
    from calstream.steps.synth.crds_cache import clear_crds_caches, sync_operational_context

    root = tmp_path_factory.mktemp("reprocess")
    crds_root, out = root / "crds", root / "uncal"
    exposures = []
    for filt, obs in FILTERS.items():
        for visit, (start, n) in VISITS.items():
            info = generate_observation(out, crds_root, detectors=DETECTORS, subarray="SUB160", ngroups=5,
                                        n_exposures=n, seed=0, start=start, observation=obs, visit=visit,
                                        filter=filt, reprocessing_contexts=True, via_datamodels=False,
                                        write_truth=False)
            for truth in info.exposures:
                for path in truth.paths:
                    exposures.append({"path": path, "stem": path.name.removesuffix("_uncal.fits"),
                                      "detector": truth.detector, "filter": filt, "visit": visit,
                                      "asn": f"o00{obs}"})
    asns = {}
    for filt, obs in FILTERS.items():
        members = [e["path"] for e in exposures if e["filter"] == filt]
        asns[f"o00{obs}"] = write_asn(out / f"jw01234-o00{obs}_image3_asn.json", f"o00{obs}", filt, members)
    sync_operational_context(crds_root, CTX[0])
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CRDS_PATH", str(crds_root))
        clear_crds_caches()
        yield {"root": root, "crds": crds_root, "exposures": exposures, "asns": asns}
    clear_crds_caches()


def write_asn(path: Path, asn_id: str, filt: str, uncals: list[Path]) -> Path:
    members = [{"expname": p.name.replace("_uncal.fits", "_cal.fits"), "exptype": "science"} for p in uncals]
    path.write_text(json.dumps({"asn_type": "image3", "asn_rule": "DMS_Level3_Base", "asn_id": asn_id,
                                "program": "01234", "asn_pool": "test", "target": "1",
                                "products": [{"name": f"jw01234-{asn_id}_t001_nircam_clear-{filt.lower()}",
                                              "members": members}]}))
    return path


def expected(data, switch: str) -> dict[str, str]:
    """stem -> restart stage of the exposures a switch must redo."""
    if switch == "gain":
        return {e["stem"]: "detector1" for e in data["exposures"] if e["detector"] == "NRCA1" and e["visit"] == 2}
    if switch == "flat":
        return {e["stem"]: "image2" for e in data["exposures"] if e["filter"] == "F150W"}
    return {}


# ---------------------------------------------------------------------------------------------
# Ledger records built without the daemon (headers + detector1 planning under jwst_0001)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def records(data) -> list[ExposureRecord]:
    from calstream.daemon.intake import read_exposure_info
    from calstream.steps.crdsrefs import NOT_APPLICABLE
    from calstream.steps.detector1 import open_ramp_source, plan_detector1

    out = []
    for i, exp in enumerate(data["exposures"], start=1):
        info = read_exposure_info(exp["path"], data["root"] / "products")
        source = open_ramp_source(exp["path"])
        try:
            plan = plan_detector1(source.exposure, context=CTX[0])
        finally:
            source.close()
        d1 = {t: Path(p).name if p != NOT_APPLICABLE else p for t, p in plan.references.items()}
        stages = {"detector1": StageUse(CTX[0], d1, (2 * i,)),
                  "image2": StageUse(CTX[0], {t: "x.fits" for t in IMAGE2_USED}, (2 * i + 1,))}
        out.append(ExposureRecord(i, exp["stem"], str(exp["path"]), dict(info.crds_parameters),
                                  {k: list(v) for k, v in info.reftypes.items()}, stages,
                                  (FILTERS[exp["filter"]],)))
    return out


def test_records_use_the_types_their_steps_ran(records):
    types = stage_reftypes(records[0])
    assert {"gain", "readnoise", "dark", "pars-jumpstep", "pars-detector1pipeline"} <= types["detector1"]
    assert "flat" not in types["detector1"]            # clean_flicker_noise (flat) did not run
    assert {"flat", "photom", "pars-flatfieldstep", "pars-image2pipeline"} <= types["image2"]


def test_gain_switch_redoes_nrca1_after_the_date_from_detector1(data, records):
    found = affected_exposures(records, CTX[0], CTX[1])
    assert {a.stem: a.restart_stage for a in found} == expected(data, "gain")
    assert all(a.changes == (GAIN,) for a in found)
    assert affected_associations(found) == [1, 2]       # NRCA1 post-date exposures are in both


def test_flat_switch_redoes_one_filter_from_image2(data, records):
    found = affected_exposures(records, CTX[1], CTX[2])
    assert {a.stem: a.restart_stage for a in found} == expected(data, "flat")
    by_stem = {e["stem"]: e for e in data["exposures"]}
    assert all(a.changes == (FLAT[by_stem[a.stem]["detector"]],) for a in found)
    assert affected_associations(found) == [2]


def test_noop_switch_changes_rules_but_affects_nothing(records):
    from crds import diff as crds_diff

    assert crds_diff.get_affected(CTX[2], CTX[3]) == {"nircam": ["photom"]}
    assert affected_exposures(records, CTX[2], CTX[3]) == []


def test_old_context_from_the_products_and_combined_switches(data, records):
    """None = each stage against the context its products were made with; 0001 -> 0003 combines."""
    assert affected_exposures(records, None, CTX[1]) == affected_exposures(records, CTX[0], CTX[1])
    combined = {a.stem: a.restart_stage for a in affected_exposures(records, None, CTX[3])}
    assert combined == {**expected(data, "flat"), **expected(data, "gain")}   # detector1 wins
    assert affected_exposures(records, CTX[3], CTX[3]) == []


def test_grouping_agrees_with_naive_selection(data):
    """Random parameters (dates across every UseAfter boundary): grouped == one crds call each."""
    import crds

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_affected import make_records

    sample = make_records(120, seed=11)
    for old, new in ((CTX[0], CTX[1]), (CTX[1], CTX[2]), (CTX[0], CTX[3])):
        grouped = {a.exposure_id: {c.reftype: (c.old, c.new) for c in a.changes}
                   for a in affected_exposures(sample, old, new)}
        for rec in sample:
            types = sorted(set().union(*stage_reftypes(rec).values()))
            pick = [crds.getrecommendations(dict(rec.crds_parameters), reftypes=types, context=c,
                                            observatory="jwst", fast=True) for c in (old, new)]
            naive = {t: tuple(str(p[t]).rsplit("/", 1)[-1] for p in pick) for t in types if pick[0][t] != pick[1][t]}
            assert grouped.get(rec.exposure_id, {}) == naive, rec.crds_parameters


# ---------------------------------------------------------------------------------------------
# calstream reprocess --dry-run / context show on a ledger
# ---------------------------------------------------------------------------------------------

def ledger_from_records(path: Path, data, records) -> Ledger:
    """A ledger holding the records as the daemon would (exposures, done jobs, products, asns)."""
    from calstream.daemon.intake import read_exposure_info

    ledger = Ledger(path)
    with ledger.transaction():
        for rec, exp in zip(records, data["exposures"]):
            input_id = ledger.add_input(rec.path, "uncal", origin="test", checksum=rec.stem, size=1, mtime_ns=1)
            exposure_id = ledger.add_exposure(input_id, read_exposure_info(exp["path"], data["root"] / "products"))
            for stage, kind in (("detector1", "rate"), ("image2", "cal")):
                job = ledger.enqueue(JobSpec.exposure(exposure_id, stage), lane="live")
                ledger.mark_running(job, 1)
                ledger.finish_job(job, "done", products=[NewProduct(f"/p/{rec.stem}_{kind}.fits", kind)],
                                  context=CTX[0], references=rec.stages[stage].references)
        for asn_id, asn_path in data["asns"].items():
            asn = json.loads(asn_path.read_text())
            members = [Member(m["expname"], "science", m["expname"].removesuffix("_cal.fits"))
                       for m in asn["products"][0]["members"]]
            ledger.upsert_association(asn_id, input_id=None, path=str(asn_path), asn_type="image3",
                                      asn_rule="DMS_Level3_Base", product_name=asn["products"][0]["name"],
                                      members=members, deadline=None, output_dir="/p")
        ledger.record_context(CTX[0], "cache")
    return ledger


def test_dry_run_prints_the_plan_and_runs_nothing(data, records, tmp_path):
    from calstream.daemon.cli import main

    path = tmp_path / "ledger.sqlite"
    ledger_from_records(path, data, records).close()
    before = path.read_bytes()
    out = StringIO()
    with redirect_stdout(out):
        code = main(["--crds-path", str(data["crds"]), "reprocess", "--dry-run", "--from", "jwst_0001.pmap",
                     "--to", "jwst_0002", "--ledger", str(path)])
    text = out.getvalue()
    assert code == 0, text
    assert "6 of 20 exposures affected, 2 association(s)" in text
    lines = text.splitlines()
    for stem in expected(data, "gain"):
        row = next(line for line in lines if stem in line)
        assert row.split()[1:] == ["detector1", *GAIN]
    assert "o001" in text and "o002" in text and "3 of 10" in text
    assert path.read_bytes() == before                      # nothing queued, nothing written
    out = StringIO()
    with redirect_stdout(out):
        assert main(["reprocess", "--dry-run", "--from", CTX[2], "--to", CTX[3], "--ledger", str(path)]) == 0
    assert "0 of 20 exposures affected, 0 association(s)" in out.getvalue()
    assert main(["reprocess", "--to", CTX[1], "--ledger", str(path)]) == 2            # --dry-run only
    assert main(["reprocess", "--dry-run", "--to", "jwst_0099.pmap", "--ledger", str(path)]) == 4


# ---------------------------------------------------------------------------------------------
# End to end: the real daemon process, three switches
# ---------------------------------------------------------------------------------------------

def _idle(ledger: Ledger) -> bool:
    counts = ledger.job_counts()
    asns = ledger.association_counts()
    return (counts.get("queued", 0) + counts.get("running", 0) == 0
            and sum(asns.get(s, 0) for s in ("done", "failed")) == len(FILTERS))


def _switched(context: str):
    def done(ledger: Ledger) -> bool:
        from calstream.daemon.reprocess import campaign

        info = campaign(ledger)
        return info is not None and info["context"] == context and _idle(ledger)
    return done


def _jobs_after(ledger: Ledger, job_id: int) -> list[dict]:
    rows = ledger._all("SELECT j.*, e.stem, a.asn_id FROM jobs j LEFT JOIN exposures e"
                       " ON j.kind='exposure' AND e.id=j.subject_id LEFT JOIN associations a"
                       " ON j.kind='association' AND a.id=j.subject_id WHERE j.id > ? ORDER BY j.id", (job_id,))
    return [dict(r) for r in rows]


def _current(ledger: Ledger) -> dict[tuple[str, str], tuple[int, str]]:
    """(exposure stem | asn id, product kind) -> (product id, path)."""
    rows = ledger._all("SELECT p.id, p.kind, p.path, e.stem, a.asn_id FROM products p LEFT JOIN exposures e"
                       " ON e.id=p.exposure_id LEFT JOIN associations a ON a.id=p.association_id WHERE p.current=1")
    return {(r["stem"] or r["asn_id"], r["kind"]): (r["id"], r["path"]) for r in rows}


def _header(path: str) -> fits.Header:
    return fits.getheader(path)


def _check_switch(d, context: str, expect: dict[str, str], asns: set[str], before: dict, kind: str,
                  keyword: str, new_refs: dict[str, str]) -> dict:
    """Exactly the expected re-runs happened (reprocess lane); products and history are right."""
    from calstream.daemon.reprocess import campaign

    ledger = d.ledger()
    try:
        info = campaign(ledger)
        jobs = _jobs_after(ledger, info["after_job_id"])
        current = _current(ledger)
        versions = {stem: ledger.product_versions(current[(stem, kind)][1]) for stem in expect}
    finally:
        ledger.close()
    assert all(j["lane"] == "reprocess" for j in jobs), jobs
    assert all(j["state"] in ("done", "failed") for j in jobs)
    redone: dict[str, set[str]] = {}
    for j in jobs:
        if j["kind"] == "exposure":
            redone.setdefault(j["stem"], set()).add(j["stage"])
    stages = {"detector1": {"detector1", "image2"}, "image2": {"image2"}}
    assert redone == {stem: stages[s] for stem, s in expect.items()}
    assert {j["asn_id"] for j in jobs if j["kind"] == "association"} == asns
    assert all(j["state"] == "done" for j in jobs if j["kind"] == "exposure")
    changed = {key for key in current if current[key][0] != before.get(key, (None,))[0]}
    kinds = {"detector1": ("rate", "rateints", "cal"), "image2": ("cal",)}
    assert {k for k in changed if k[1] in kinds["detector1"]} == {
        (stem, k) for stem, s in expect.items() for k in kinds[s] if (stem, k) in before}
    for stem in expect:
        header = _header(current[(stem, kind)][1])
        assert header["CRDS_CTX"] == context
        assert header[keyword] == f"crds://{new_refs[stem]}"
        old = [v for v in versions[stem] if not v.current]
        assert old and all("/history/jwst_000" in v.path and Path(v.path).is_file() for v in old)
        newest_old = max(old, key=lambda v: v.version)
        assert f"/history/{newest_old.crds_context}/" in newest_old.path
        assert _header(newest_old.path)["CRDS_CTX"] == newest_old.crds_context != context
    for asn_id in asns:
        i2d = current.get((asn_id, "i2d"))
        if i2d is not None:                       # stage 3 available in this checkout
            assert _header(i2d[1])["CRDS_CTX"] == context
    return current


def test_daemon_reprocesses_exactly_what_each_switch_changes(data, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_daemon_e2e import DaemonProcess

    from calstream.daemon.cli import main
    from calstream.steps.synth.crds_cache import sync_operational_context

    sync_operational_context(data["crds"], CTX[0])
    config = tmp_path / "calstream.toml"
    config.write_text('[crds]\npolicy = "auto"\nhistory = "history"\nwatch_seconds = 0.3\n')
    d = DaemonProcess(tmp_path, data["crds"], "--config", str(config)).start()
    try:
        for exp in data["exposures"]:
            d.drop(exp["path"])
        for asn in data["asns"].values():
            d.drop(asn)
        d.wait(lambda lg: _idle(lg) and len([k for k in _current(lg) if k[1] == "cal"]) == 20, 600,
               "first calibration of 20 exposures")  # generous: shared CI machines
        ledger = d.ledger()
        before = _current(ledger)
        assert {c["context"] for c in ledger.contexts() if c["active"]} == {CTX[0]}
        ledger.close()
        by_stem = {e["stem"]: e for e in data["exposures"]}

        # 1. crds sync makes jwst_0002 operational: NRCA1 after the date, from detector1, both asns
        sync_operational_context(data["crds"], CTX[1])
        d.wait(_switched(CTX[1]), 400, "re-processing to jwst_0002")
        gain = expected(data, "gain")
        before = _check_switch(d, CTX[1], gain, {"o001", "o002"}, before, "rate", "R_GAIN",
                               {stem: GAIN[2] for stem in gain})

        # 2. the operator switches to jwst_0003: F150W from image2 (the existing rate), one asn
        out = StringIO()
        with redirect_stdout(out):
            assert main(["context", "use", CTX[2], "--ledger", str(d.ledger_path), "--wait", "30"]) == 0
        assert f"context {CTX[2]} in use" in out.getvalue()
        d.wait(_switched(CTX[2]), 400, "re-processing to jwst_0003")
        flat = expected(data, "flat")
        before = _check_switch(d, CTX[2], flat, {"o002"}, before, "cal", "R_FLAT",
                               {stem: FLAT[by_stem[stem]["detector"]][2] for stem in flat})
        d.wait_metric('calstream_reprocess_affected{kind="exposures"} 10.0', 30)

        # 3. jwst_0004 changes a rule but no selection: recorded, nothing re-runs
        sync_operational_context(data["crds"], CTX[3])
        d.wait(_switched(CTX[3]), 120, "the jwst_0004 plan")
        time.sleep(1.0)
        ledger = d.ledger()
        try:
            from calstream.daemon.reprocess import campaign

            info = campaign(ledger)
            assert info["exposures"] == 0 and _jobs_after(ledger, info["after_job_id"]) == []
            assert _current(ledger) == before
            assert ledger.active_context() == CTX[3]
        finally:
            ledger.close()
        status = subprocess.run([sys.executable, "-m", "calstream.daemon.cli", "status", "--ledger",
                                 str(d.ledger_path)], capture_output=True, text=True, check=True).stdout
        assert "re-processing to jwst_0004.pmap" in status and "affected 0 exposure(s)" in status
        shown = subprocess.run([sys.executable, "-m", "calstream.daemon.cli", "context", "show", "--ledger",
                                str(d.ledger_path)], capture_output=True, text=True, check=True).stdout
        assert f"in use: {CTX[3]}" in shown and all(c in shown for c in CTX)
        assert d.stop() == 0
    finally:
        if d.proc is not None:
            d.proc.kill()


# ---------------------------------------------------------------------------------------------
# The policy on a stand-in daemon: pin, manual policy, operator, exposures busy at the switch
# ---------------------------------------------------------------------------------------------

class StandInDaemon:
    """The seams of :class:`calstream.daemon.service.Daemon` the policy uses, driven by the test
    (``pump`` plays the main loop)."""

    def __init__(self, config, ledger: Ledger) -> None:
        import threading

        from calstream.daemon.metrics import Metrics

        self.config, self.ledger, self.metrics = config, ledger, Metrics()
        self.listeners, self.hooks, self.handlers, self.calls = [], [], {}, []
        self.recycled = 0
        self.main = threading.current_thread()

    def add_context_listener(self, listener) -> None:
        self.listeners.append(listener)

    def add_pre_dispatch(self, hook) -> None:
        self.hooks.append(hook)

    def add_request_handler(self, command, handler) -> None:
        self.handlers[command] = handler

    def call_soon(self, fn) -> None:
        self.calls.append(fn)

    def recycle_workers(self) -> None:
        self.recycled += 1

    def on_context_change(self, context: str, origin: str) -> None:
        import threading

        if threading.current_thread() is not self.main:
            self.call_soon(lambda: self.on_context_change(context, origin))
            return
        self.ledger.record_context(context, origin, active=True)
        for listener in self.listeners:
            listener(context, origin, self)

    def pump(self, until, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "timed out"
            while self.calls:
                self.calls.pop(0)()
            time.sleep(0.05)


def _reprocess_jobs(ledger: Ledger) -> dict[str, str]:
    rows = ledger._all("SELECT e.stem, j.stage FROM jobs j JOIN exposures e ON e.id=j.subject_id"
                       " WHERE j.lane='reprocess' AND j.kind='exposure'")
    return {r["stem"]: r["stage"] for r in rows}


@pytest.mark.parametrize("mode", ["pinned", "manual"])
def test_switch_waits_for_the_operator(data, records, tmp_path, mode):
    """Pinned (or policy manual): a synced context is recorded and waits; `context use` re-processes.
    An exposure busy at the switch is re-checked once its job is done."""
    from calstream.daemon.config import DaemonConfig
    from calstream.daemon.reprocess import WAITING_KEY, campaign, progress_lines
    from calstream.daemon.requeue import Requeue
    from calstream.steps.synth.crds_cache import sync_operational_context

    sync_operational_context(data["crds"], CTX[0])
    ledger = ledger_from_records(tmp_path / "ledger.sqlite", data, records)
    config = DaemonConfig(ledger=tmp_path / "ledger.sqlite", output_dir=tmp_path, crds_path=data["crds"],
                          crds_context=CTX[0] if mode == "pinned" else None,
                          sections={"crds": {"policy": "auto" if mode == "pinned" else "manual",
                                             "watch_seconds": 0.1}})
    daemon = StandInDaemon(config, ledger)
    policy = Requeue(daemon)
    try:
        if mode == "pinned":
            daemon.on_context_change(CTX[0], "config")        # what Daemon._start does for a pin
        daemon.pump(lambda: policy._started and policy._planning is None)   # start-up check done
        busy = sorted(expected(data, "gain"))[0]
        busy_id = next(r.exposure_id for r in records if r.stem == busy)
        job = ledger.enqueue(JobSpec.exposure(busy_id, "image2"), lane="live")   # in flight at the switch

        sync_operational_context(data["crds"], CTX[1])        # crds sync
        daemon.pump(lambda: CTX[1] in (ledger.get_meta(WAITING_KEY) or ""))
        time.sleep(0.3)
        daemon.pump(lambda: True)
        assert _reprocess_jobs(ledger) == {} and campaign(ledger) is None
        assert ledger.active_context() == (CTX[0] if mode == "pinned" else CTX[1])
        assert any("waiting for the operator: jwst_0002.pmap" in line for line in progress_lines(ledger))

        answer = daemon.handlers["context"](CTX[1])             # calstream context use jwst_0002.pmap
        assert answer.startswith(f"context {CTX[1]} in use")
        assert ledger.active_context() == CTX[1] and daemon.recycled >= 1
        if mode == "pinned":
            assert config.crds_context == CTX[1]                # the operator re-pinned
        daemon.pump(lambda: campaign(ledger) is not None)
        gain = expected(data, "gain")
        assert _reprocess_jobs(ledger) == {s: st for s, st in gain.items() if s != busy}
        assert policy.deferred == {busy_id}
        assert json.loads(ledger.get_meta(WAITING_KEY)) == []
        planned = campaign(ledger)
        daemon.on_context_change(CTX[1], "kafka:calstream.crds-contexts/0/7")   # replayed after a reconnect
        daemon.pump(lambda: policy._planning is None)
        assert campaign(ledger) == planned and policy.deferred == {busy_id}     # the campaign goes on

        ledger.mark_running(job, 1)                              # the in-flight job ends (old context)
        ledger.finish_job(job, "done", products=[NewProduct(f"/p/{busy}_cal.fits", "cal")], context=CTX[0],
                          references={t: "x.fits" for t in IMAGE2_USED})
        daemon.pump(lambda: not policy.deferred and policy._planning is None, timeout=60)
        assert _reprocess_jobs(ledger) == gain
        assert "affected 6 exposure(s)" in "\n".join(progress_lines(ledger))
        assert daemon.handlers["context"]("jwst_0099.pmap").startswith("error: context jwst_0099.pmap is not")
    finally:
        policy.stop()
        ledger.close()
        sync_operational_context(data["crds"], CTX[0])


def test_history_keeps_versions_by_context(tmp_path):
    from calstream.daemon.history import history_path, in_history, keep_version

    product = tmp_path / "out" / "jw1" / "a_cal.fits"
    product.parent.mkdir(parents=True)
    product.write_bytes(b"v1")
    kept = keep_version(product, CTX[0], tmp_path / "out")
    assert kept == tmp_path / "out/jw1/history/jwst_0001.pmap/a_cal.fits" and kept.read_bytes() == b"v1"
    assert in_history(kept) and not in_history(product)
    assert not in_history(tmp_path / "history" / "jw1" / "a_cal.fits")      # an output root named history
    product.unlink()
    product.write_bytes(b"v2")                       # another version made under the same context
    again = keep_version(product, CTX[0], tmp_path / "out", version=2)
    assert again.name == "a_cal_v2.fits" and again.read_bytes() == b"v2" and kept.read_bytes() == b"v1"
    assert history_path(product, CTX[1], tmp_path / "out", str(tmp_path / "h")) == \
        tmp_path / "h/jwst_0002.pmap/jw1/a_cal.fits"


def test_parameter_references_count(tmp_path, monkeypatch):
    """A new pars-jumpstep redoes detector1; a new pars-flatfieldstep (no step ran with a recorded
    reference for it) redoes image2 — parameter references count whether or not they are R_* types."""
    from calstream.steps.synth import crds_cache as cc

    flat_spec = {("nircam", "pars-flatfieldstep"): cc.RefTypeSpec((), ".asdf")}
    base = [cc.RuleRow("gain", ("NRCA1", "SUB160"), "2022-01-01 00:00:00", "jwst_nircam_gain_0301.fits"),
            cc.RuleRow("pars-jumpstep", (), "1900-01-01 00:00:00", "jwst_nircam_pars-jumpstep_0001.asdf"),
            cc.RuleRow("pars-flatfieldstep", (), "1900-01-01 00:00:00", "jwst_nircam_pars-flatfieldstep_0001.asdf")]
    jump = [r if r.reftype != "pars-jumpstep" else
            cc.RuleRow(r.reftype, (), r.useafter, "jwst_nircam_pars-jumpstep_0002.asdf") for r in base]
    flat = [r if r.reftype != "pars-flatfieldstep" else
            cc.RuleRow(r.reftype, (), r.useafter, "jwst_nircam_pars-flatfieldstep_0002.asdf") for r in jump]
    cc.ensure_layout(tmp_path)
    names = cc.write_contexts(tmp_path, [base, jump, flat], specs=flat_spec)
    cc.write_server_config(tmp_path, names)
    params = {"META.INSTRUMENT.NAME": "NIRCAM", "META.INSTRUMENT.DETECTOR": "NRCA1", "META.SUBARRAY.NAME": "SUB160",
              "META.OBSERVATION.DATE": "2024-03-01", "META.OBSERVATION.TIME": "12:00:00", "META.VISIT.TSOVISIT": False}
    record = ExposureRecord(1, "x", "x_uncal.fits", params,
                            {"detector1": ["gain", "pars-jumpstep"], "image2": ["flat", "pars-flatfieldstep"]},
                            {"detector1": StageUse(names[0], {"gain": "jwst_nircam_gain_0301.fits"}),
                             "image2": StageUse(names[0], {"flat": "N/A"})})
    monkeypatch.setenv("CRDS_PATH", str(tmp_path))
    cc.clear_crds_caches()
    try:
        [first] = affected_exposures([record], names[0], names[1])
        assert first.restart_stage == "detector1"
        assert first.changes == (("pars-jumpstep", "jwst_nircam_pars-jumpstep_0001.asdf",
                                  "jwst_nircam_pars-jumpstep_0002.asdf"),)
        [second] = affected_exposures([record], names[1], names[2])
        assert second.restart_stage == "image2" and [c.reftype for c in second.changes] == ["pars-flatfieldstep"]
    finally:
        monkeypatch.undo()
        cc.clear_crds_caches()
