"""calwebb_image2 + calwebb_image3: calstream beside jwst on the same dithered exposures (4 by default).

Usage: python bench/bench_image3.py [--subarray FULL] [--exposures 4] [--workdir bench-output] [--no-jwst]

The field (synth.field: dithered NRCA1 exposures with stars, galaxies and cosmic rays) is
generated and run through calwebb_detector1 once, cached under ``<workdir>/image3_<subarray>/``
(``image3_<subarray>_<n>x/`` for another number of exposures).
Everything measured runs single-core (taskset to CPU 0, one thread) in its own subprocess, which
reports its wall time and CPU time (imports excluded) and peak RSS (VmHWM):

* calstream: calwebb_image2 on the four rate files, then calwebb_image3 on their association;
* jwst 3.0: Image2Pipeline (resample skipped, like calstream's default), then on calstream's cal
  files ResampleStep, OutlierDetectionStep and Image3Pipeline (source_catalog skipped: the
  synthetic CRDS cache has no apcorr/abvegaoffset references; compared with calstream's time
  without its source_catalog step).

Prints both sides and the ratios (jwst / calstream: higher is better for us).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench_detector1 import _subprocess, peak_rss_mb

CONTEXT = "jwst_0002.pmap"


def case_folder(workdir: Path, subarray: str, exposures: int) -> Path:
    return workdir / (f"image3_{subarray.lower()}" + ("" if exposures == 4 else f"_{exposures}x"))


def generate(workdir: Path, subarray: str, exposures: int = 4) -> dict[str, str]:
    """The field's rate files and CRDS cache (generated and run through detector1 once)."""
    root = case_folder(workdir, subarray, exposures)
    marker = root / "rates.json"
    if marker.exists():
        return json.loads(marker.read_text())
    crds_root = root / "crds"
    os.environ["CRDS_PATH"] = str(crds_root)
    os.environ.setdefault("CRDS_SERVER_URL", "https://crds-serverless-mode.stsci.edu")
    from calstream.steps.detector1 import calibrate_file
    from calstream.steps.synth.field import generate_field

    field = generate_field(root / "data", crds_root, subarray=subarray, seed=7, n_exposures=exposures)
    rates = [str(calibrate_file(u, root / "data", context=field.context, fsync=False).products["rate"])
             for u in field.uncal_paths]
    info = {"crds_root": str(crds_root), "context": field.context, "rates": rates, "root": str(root),
            "jwst_rates": _with_asdf_extension(rates, root / "jwst_rates")}
    marker.write_text(json.dumps(info, indent=1))
    return info


def _with_asdf_extension(rates: list[str], folder: Path) -> list[str]:
    """Copies of the rate files saved through stdatamodels: jwst 3.0 reads step parameters from
    the ASDF extension, which calstream's plain-FITS rate products do not carry."""
    import warnings

    from stdatamodels.jwst.datamodels import ImageModel

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for rate in rates:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with ImageModel(rate) as model:
                model.save(str(folder / Path(rate).name))
        out.append(str(folder / Path(rate).name))
    return out


# -- workers (run in subprocesses) ---------------------------------------------------------------
def worker(kind: str, spec_json: str) -> None:
    spec = json.loads(spec_json)
    os.environ["CRDS_PATH"] = spec["crds_root"]
    os.environ.setdefault("CRDS_SERVER_URL", "https://crds-serverless-mode.stsci.edu")
    os.environ["CRDS_CONTEXT"] = spec["context"]
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    extra: dict = {}
    cpu0 = 0.0
    if kind == "ours_image2":
        from calstream.steps.image2 import calibrate_rate_file

        imported, cpu0 = time.perf_counter(), _cpu_seconds()
        for rate in spec["rates"]:
            calibrate_rate_file(rate, out, context=spec["context"])
    elif kind == "ours_image3":
        from calstream.steps.image3 import calibrate_association

        imported, cpu0 = time.perf_counter(), _cpu_seconds()
        result = calibrate_association(spec["asn"], out, context=spec["context"])
        extra = {"steps": result.step_seconds, "status": result.status}
    elif kind == "jwst_image2":
        from jwst.pipeline import Image2Pipeline

        imported, cpu0 = time.perf_counter(), _cpu_seconds()
        for rate in spec["rates"]:
            Image2Pipeline.call(rate, output_dir=str(out), save_results=True, steps={"resample": {"skip": True}})
    elif kind == "jwst_resample":
        from jwst.resample import ResampleStep

        imported, cpu0 = time.perf_counter(), _cpu_seconds()
        ResampleStep.call(spec["asn"], output_dir=str(out), save_results=True)
    elif kind == "jwst_outlier":
        from jwst.outlier_detection import OutlierDetectionStep

        imported, cpu0 = time.perf_counter(), _cpu_seconds()
        OutlierDetectionStep.call(spec["asn"], output_dir=str(out), save_results=True, in_memory=True)
    elif kind == "jwst_image3":
        from jwst.pipeline import Image3Pipeline

        imported, cpu0 = time.perf_counter(), _cpu_seconds()
        # no apcorr/abvegaoffset references in the synthetic CRDS cache: jwst's source_catalog cannot run
        Image3Pipeline.call(spec["asn"], output_dir=str(out), save_results=True,
                            steps={"source_catalog": {"skip": True}})
    else:
        raise SystemExit(f"unknown worker {kind}")
    done = time.perf_counter()
    print(json.dumps({"seconds": done - imported, "import": imported - t0, "cpu_s": _cpu_seconds() - cpu0,
                      "maxrss_mb": peak_rss_mb(), **extra}))


def _cpu_seconds() -> float:
    """User + system CPU time of this process (insensitive to other load on the machine)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(kind: str, spec: dict) -> dict:
    stdout, _ = _subprocess([sys.executable, __file__, "worker", kind, json.dumps(spec)], {})
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subarray", default="FULL")
    parser.add_argument("--workdir", default="bench-output")
    parser.add_argument("--exposures", type=int, default=4, help="dithered exposures (default 4)")
    parser.add_argument("--no-jwst", action="store_true")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    info = generate(workdir, args.subarray.upper(), args.exposures)
    run = case_folder(workdir, args.subarray, args.exposures) / f"run_{time.strftime('%Y%m%d_%H%M%S')}"
    base = {"crds_root": info["crds_root"], "context": info["context"], "rates": info["rates"]}
    results: dict[str, dict] = {}
    results["ours_image2"] = measure("ours_image2", {**base, "out": str(run / "cal")})
    from calstream.steps.asn import asn_from_list, write_association

    cals = sorted(p.name for p in (run / "cal").glob("*_cal.fits"))
    asn = write_association(asn_from_list(cals, "bench_field"), run / "cal" / "bench_field_asn.json")
    spec = {**base, "asn": str(asn)}
    results["ours_image3"] = measure("ours_image3", {**spec, "out": str(run / "ours_image3")})
    if not args.no_jwst:
        results["jwst_image2"] = measure("jwst_image2", {**base, "rates": info["jwst_rates"],
                                                         "out": str(run / "jwst_cal")})
        for kind in ("jwst_resample", "jwst_outlier", "jwst_image3"):
            try:
                results[kind] = measure(kind, {**spec, "out": str(run / kind)})
            except RuntimeError as exc:     # report what runs; say what did not
                results[kind] = {"error": str(exc)[-500:]}
    (run / "bench_image3.json").write_text(json.dumps(results, indent=1))
    _print(args.subarray.upper(), args.exposures, results)


def _row(label: str, ours: float | None, theirs: float | None) -> None:
    ratio = theirs / ours if ours and theirs else float("nan")
    fmt = lambda v: f"{v:10.2f}" if v is not None else f"{'-':>10s}"  # noqa: E731
    print(f"  {label:40s} {fmt(ours)} {fmt(theirs)} {ratio:9.1f}x")


def _print(subarray: str, exposures: int, r: dict) -> None:
    ours2, ours3 = r["ours_image2"], r["ours_image3"]
    steps = ours3.get("steps", {})
    get = lambda k, f: r.get(k, {}).get(f)  # noqa: E731
    print(f"\ncalwebb_image2 + calwebb_image3, {exposures} x {subarray} NRCA1 exposures, single core")
    print(f"  {'measure':40s} {'calstream':>10s} {'jwst':>10s} {'jwst/ours':>10s}")
    _row(f"image2, {exposures} exposures [s]", ours2["seconds"], get("jwst_image2", "seconds"))
    _row(f"image2, {exposures} exposures, CPU [s]", ours2.get("cpu_s"), get("jwst_image2", "cpu_s"))
    _row("image2 peak RSS [MB]", ours2["maxrss_mb"], get("jwst_image2", "maxrss_mb"))
    _row("image3 without source_catalog [s]", ours3["seconds"] - steps.get("source_catalog", 0.0),
         get("jwst_image3", "seconds"))
    _row("image3 without source_catalog, CPU [s]", ours3["cpu_s"] - steps.get("source_catalog", 0.0),
         get("jwst_image3", "cpu_s"))
    _row("image3 peak RSS [MB]", ours3["maxrss_mb"], get("jwst_image3", "maxrss_mb"))
    _row("resample step [s]", steps.get("resample", 0) + steps.get("write_i2d", 0), get("jwst_resample", "seconds"))
    _row("outlier_detection step [s]", steps.get("outlier_detection"), get("jwst_outlier", "seconds"))
    _row("jwst ResampleStep / OutlierDetectionStep CPU [s]", None, get("jwst_resample", "cpu_s"))
    _row("", None, get("jwst_outlier", "cpu_s"))
    _row("peak RSS: our image3 vs jwst ResampleStep [MB]", ours3["maxrss_mb"], get("jwst_resample", "maxrss_mb"))
    _row("peak RSS: our image3 vs jwst OutlierDet. [MB]", ours3["maxrss_mb"], get("jwst_outlier", "maxrss_mb"))
    print("  calstream image3 steps [s]: " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()))
    for kind in ("jwst_resample", "jwst_outlier", "jwst_image3"):
        if "error" in r.get(kind, {}):
            print(f"  {kind} did not run: {r[kind]['error'][-200:]}")


if __name__ == "__main__":
    main()
