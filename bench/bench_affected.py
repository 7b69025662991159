"""Benchmark the affected-set computation of a CRDS context change (issue 6: < 10 s for 10,000).

Usage: python bench/bench_affected.py [--records 10000] [--crds-path DIR] [--no-ledger] [--check 300]

Builds (or reuses) the synthetic CRDS cache with the re-processing contexts, then makes
``--records`` NIRCam exposures with random detector (NRCA1/NRCB1), filter (F200W/F150W),
subarray and observation date-time (2022-06 .. 2025-01), each with detector1 and image2
products made under jwst_0001.pmap. Timed, for the switches 0001->0002 (gain), 0002->0003
(flat), 0003->0004 (no-op) and 0001->0004 (all):

* ``records``: :func:`calstream.daemon.affected.affected_exposures` on in-memory records
  (first call includes loading the contexts);
* ``ledger``: the same records read from a real SQLite ledger
  (``Ledger.exposures_for_reprocessing``) plus the computation;
* ``daemon plan``: ``python -m calstream.daemon.reprocess --plan-json`` on that ledger, the child
  process the daemon runs on a switch (interpreter and crds start-up included).

``--check N`` compares the grouped result with a naive per-exposure crds evaluation on N random
records (must agree exactly).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CRDS_SERVER_URL", "https://crds-serverless-mode.stsci.edu")

SWITCHES = [("jwst_0001.pmap", "jwst_0002.pmap"), ("jwst_0002.pmap", "jwst_0003.pmap"),
            ("jwst_0003.pmap", "jwst_0004.pmap"), ("jwst_0001.pmap", "jwst_0004.pmap")]
DETECTOR1_USED = ("dark", "gain", "ipc", "linearity", "mask", "readnoise", "saturation", "superbias")
IMAGE2_USED = ("area", "distortion", "filteroffset", "flat", "photom")


def synthetic_parameters(rng: random.Random) -> dict:
    """One exposure's CRDS selection parameters (META.* names)."""
    day = rng.randrange(0, 945)          # 2022-06-01 + day
    date = time.strftime("%Y-%m-%d", time.gmtime(1654041600 + 86400 * day))
    clock = f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}.{rng.randrange(1000):03d}"
    return {"META.INSTRUMENT.NAME": "NIRCAM", "META.INSTRUMENT.DETECTOR": rng.choice(("NRCA1", "NRCB1")),
            "META.INSTRUMENT.FILTER": rng.choice(("F200W", "F150W")), "META.INSTRUMENT.PUPIL": "CLEAR",
            "META.EXPOSURE.TYPE": "NRC_IMAGE", "META.SUBARRAY.NAME": rng.choice(("SUB160", "SUB640")),
            "META.EXPOSURE.READPATT": rng.choice(("RAPID", "BRIGHT2")), "META.VISIT.TSOVISIT": False,
            "META.OBSERVATION.DATE": date, "META.OBSERVATION.TIME": clock,
            "META.EXPOSURE.NGROUPS": rng.randrange(2, 20), "META.TARGET.RA": rng.uniform(0, 360)}


def make_records(n: int, seed: int = 7) -> list:
    from calstream.daemon.intake import _reftypes
    from calstream.daemon.ledger import ExposureRecord, StageUse

    rng = random.Random(seed)
    reftypes = _reftypes("NRC_IMAGE")
    stages = {"detector1": StageUse("jwst_0001.pmap", {t: "x.fits" for t in DETECTOR1_USED}),
              "image2": StageUse("jwst_0001.pmap", {t: "x.fits" for t in IMAGE2_USED})}
    return [ExposureRecord(i + 1, f"jw01234{i:06d}_nrc", f"/in/{i}.fits", synthetic_parameters(rng), reftypes,
                           stages, (1 + i % 50,)) for i in range(n)]


def fill_ledger(path: Path, records: list):
    """A real ledger holding ``records`` (exposure rows, done jobs, products with references)."""
    from calstream.daemon.ledger import ExposureInfo, JobSpec, Ledger, NewProduct

    ledger = Ledger(path)
    with ledger.transaction():
        for rec in records:
            input_id = ledger.add_input(rec.path, "uncal", origin="bench", checksum=f"c{rec.exposure_id}",
                                        size=1, mtime_ns=1)
            info = ExposureInfo(rec.path, rec.stem, rec.stem, None, 1, "NIRCAM",
                                rec.crds_parameters["META.INSTRUMENT.DETECTOR"], "NRC_IMAGE", (1, 10, 160, 160),
                                1, rec.crds_parameters, {"detector1": "calwebb_detector1", "image2": "calwebb_image2"},
                                rec.reftypes, "/out")
            exposure_id = ledger.add_exposure(input_id, info)
            for stage, kind in (("detector1", "rate"), ("image2", "cal")):
                job = ledger.enqueue(JobSpec.exposure(exposure_id, stage), lane="live")
                ledger.mark_running(job, 1)
                use = rec.stages[stage]
                ledger.finish_job(job, "done", products=[NewProduct(f"/out/{rec.stem}_{kind}.fits", kind)],
                                  context=use.context, references=use.references, cal_ver="bench")
            ledger.set_input_state(input_id, "done")
    return ledger


def naive_changes(record, old: str, new: str) -> dict:
    """Per-record evaluation without grouping or pre-filter: {reftype: (old, new)} that differ."""
    import crds

    from calstream.daemon.affected import stage_reftypes

    types = sorted(set().union(*stage_reftypes(record).values()))
    pick = {}
    for ctx in (old, new):
        found = crds.getrecommendations(dict(record.crds_parameters), reftypes=types, context=ctx,
                                        observatory="jwst", fast=True)
        pick[ctx] = {t: str(found[t]).rsplit("/", 1)[-1] for t in types}
    return {t: (pick[old][t], pick[new][t]) for t in types if pick[old][t] != pick[new][t]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--crds-path", help="reuse/create the synthetic cache here (default: a temp folder)")
    parser.add_argument("--no-ledger", action="store_true", help="skip the SQLite ledger timing")
    parser.add_argument("--check", type=int, default=300, help="records checked against naive evaluation")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_affected_") as tmp:
        root = Path(args.crds_path or Path(tmp) / "crds")
        os.environ["CRDS_PATH"] = str(root)
        from calstream.steps.synth.crds_cache import build_crds_cache

        started = time.perf_counter()
        build_crds_cache(root, detectors=("NRCA1", "NRCB1"), subarrays=("SUB160", "SUB640"),
                         reprocessing_contexts=True)
        print(f"CRDS cache ready in {time.perf_counter() - started:.1f} s: {root}")
        from calstream.daemon.affected import affected_exposures

        records = make_records(args.records)
        print(f"{len(records)} exposures (2 detectors x 2 filters x 2 subarrays, dates 2022-06..2025-01)")
        for old, new in SWITCHES:
            started = time.perf_counter()
            found = affected_exposures(records, old, new)
            seconds = time.perf_counter() - started
            stages = {s: sum(a.restart_stage == s for a in found) for s in ("detector1", "image2")}
            print(f"records  {old} -> {new}: {len(found):5d} affected {stages}  {seconds:.3f} s")
        if not args.no_ledger:
            started = time.perf_counter()
            ledger = fill_ledger(Path(tmp) / "ledger.sqlite", records)
            print(f"ledger filled in {time.perf_counter() - started:.1f} s")
            for old, new in SWITCHES:
                started = time.perf_counter()
                found = affected_exposures(ledger.exposures_for_reprocessing(), None if old.endswith("1.pmap")
                                           else old, new)
                print(f"ledger   {old} -> {new}: {len(found):5d} affected  {time.perf_counter() - started:.3f} s"
                      " (read + compute)")
            ledger.close()
            started = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "calstream.daemon.reprocess", "--plan-json", "--ledger",
                                  str(Path(tmp) / "ledger.sqlite"), "--to", SWITCHES[-1][1]],
                                 capture_output=True, text=True, check=True).stdout
            print(f"daemon plan (child process: start-up, crds import, ledger, busy checks, compute) -> "
                  f"{SWITCHES[-1][1]}: {len(json.loads(out)['affected'])} affected  "
                  f"{time.perf_counter() - started:.3f} s")
        if args.check:
            sample = random.Random(3).sample(records, min(args.check, len(records)))
            bad = 0
            for old, new in SWITCHES:
                grouped = {a.exposure_id: {c.reftype: (c.old, c.new) for c in a.changes}
                           for a in affected_exposures(sample, old, new)}
                for rec in sample:
                    bad += grouped.get(rec.exposure_id, {}) != naive_changes(rec, old, new)
            print(f"check: {len(sample)} records x {len(SWITCHES)} switches vs naive crds evaluation: "
                  f"{bad} disagreements")
            if bad:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
