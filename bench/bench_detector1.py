"""calwebb_detector1: calstream beside jwst's Detector1Pipeline on the same files and references.

Usage: python bench/bench_detector1.py [--cases full,sub640] [--workdir bench-output] [--no-jwst]

Cases: NIRCam full frame 1 x 10 x 2048 x 2048 (full-frame references) and a 3 x 10 x 640 x 640
SUB640 subarray. Everything runs single-core (taskset to CPU 0, one thread). Measured, each in a
fresh subprocess:

* warm: the pipeline run a second time in the same process (numba cache warm, imports done);
* process: the whole one-shot CLI (`calstream run` vs jwst's `strun`), imports included;
* peak RSS of a process that runs one exposure once.

Prints both sides and the ratios (jwst / calstream: higher is better for us).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SINGLE_CORE_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                   "NUMBA_NUM_THREADS": "1", "STPIPE_DISABLE_CRDS_STEPPARS": "0"}
CASES = {
    "full": dict(subarray="FULL", nints=1, ngroups=10, full_frame_references=True),
    "sub640": dict(subarray="SUB640", nints=3, ngroups=10, full_frame_references=False),
}


def generate(workdir: Path, case: str) -> tuple[Path, Path]:
    """The case's uncal file and CRDS cache (generated once, reused)."""
    crds_root = workdir / f"crds_{case}"
    os.environ["CRDS_PATH"] = str(crds_root)
    from calstream.steps.synth import generate_observation

    info = generate_observation(workdir / f"data_{case}", crds_root, detectors=("NRCA1",), seed=7,
                                **CASES[case])
    return info.uncal_paths[0], crds_root


# -- workers (run in subprocesses) ---------------------------------------------------------------
def worker(kind: str, uncal: str, crds_root: str, outdir: str, repeat: int) -> None:
    os.environ["CRDS_PATH"] = crds_root
    os.environ.setdefault("CRDS_SERVER_URL", "https://crds-serverless-mode.stsci.edu")
    times = []
    t0 = time.perf_counter()
    if kind == "ours":
        from calstream.steps.detector1 import calibrate_file

        run = lambda out: calibrate_file(uncal, out, fsync=False)  # noqa: E731
    else:
        os.environ["CRDS_CONTEXT"] = "jwst_0002.pmap"
        from jwst.pipeline import Detector1Pipeline

        run = lambda out: Detector1Pipeline.call(uncal, output_dir=out, save_results=True)  # noqa: E731
    import_seconds = time.perf_counter() - t0
    for k in range(repeat):   # each run writes new files, as a new exposure would
        os.makedirs(os.path.join(outdir, f"run{k}"), exist_ok=True)
        t = time.perf_counter()
        run(os.path.join(outdir, f"run{k}"))
        times.append(time.perf_counter() - t)
    print(json.dumps({"times": times, "import": import_seconds, "maxrss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _subprocess(args: list[str], env_extra: dict[str, str]) -> tuple[str, float]:
    env = dict(os.environ, **SINGLE_CORE_ENV, **env_extra)
    cmd = (["taskset", "-c", "0"] if shutil.which("taskset") else []) + args
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    elapsed = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout, elapsed


def measure(kind: str, uncal: Path, crds_root: Path, out: Path) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, __file__, "worker", kind, str(uncal), str(crds_root), str(out)]
    warm = json.loads(_subprocess(me + ["2"], {})[0].strip().splitlines()[-1])
    once = json.loads(_subprocess(me + ["1"], {})[0].strip().splitlines()[-1])
    bindir = Path(sys.executable).parent
    if kind == "ours":
        cli = [str(bindir / "calstream"), "--crds-path", str(crds_root), "run", "calwebb_detector1",
               str(uncal), "--output-dir", str(out)]
        env = {}
    else:
        cli = [str(bindir / "strun"), "calwebb_detector1", str(uncal), "--output_dir", str(out)]
        env = {"CRDS_PATH": str(crds_root), "CRDS_CONTEXT": "jwst_0002.pmap",
               "CRDS_SERVER_URL": "https://crds-serverless-mode.stsci.edu"}
    _, process_seconds = _subprocess(cli, env)
    return {"warm_s": warm["times"][-1], "first_s": warm["times"][0], "process_s": process_seconds,
            "peak_rss_mb": once["maxrss_mb"]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="full,sub640")
    parser.add_argument("--workdir", default="bench-output")
    parser.add_argument("--no-jwst", action="store_true")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    results = {}
    for case in args.cases.split(","):
        uncal, crds_root = generate(workdir, case)
        ours = measure("ours", uncal, crds_root, workdir / f"out_{case}_ours")
        theirs = None if args.no_jwst else measure("jwst", uncal, crds_root, workdir / f"out_{case}_jwst")
        results[case] = (ours, theirs)
        _print_case(case, ours, theirs)
    (workdir / "bench_detector1.json").write_text(json.dumps(results, indent=1))


def _print_case(case: str, ours: dict[str, float], theirs: dict[str, float] | None) -> None:
    print(f"\ncalwebb_detector1, {case} ({CASES[case]['nints']} x {CASES[case]['ngroups']} groups), single core")
    print(f"  {'measure':22s} {'calstream':>10s} {'jwst':>10s} {'jwst/ours':>10s}")
    for key, label in (("warm_s", "warm run [s]"), ("process_s", "one-shot CLI [s]"),
                       ("peak_rss_mb", "peak RSS [MB]"), ("first_s", "first run in proc [s]")):
        their = theirs[key] if theirs else float("nan")
        print(f"  {label:22s} {ours[key]:10.2f} {their:10.2f} {their / ours[key]:10.1f}x")


if __name__ == "__main__":
    main()
