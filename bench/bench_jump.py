"""Benchmark calstream's jump detection against stcal's two-point difference (single core).

Usage: python bench/bench_jump.py [--nints 1] [--ngroups 10] [--size 2048] [--no-stcal]

Each implementation runs in its own subprocess on identical synthetic ramps (seeded): a few
hundred DN/group of signal, ~10 DN read noise, ~1e-4 jumps per pixel and group, 0.1 %
saturating pixels. Prints wall times (ours warm: numba compiled beforehand on a small ramp),
the speed-up, the peak resident memory above the inputs, and the agreement of the JUMP_DET
flags.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

NFRAMES = 1
GROUP_TIME = 10.737  # s, NIRCam full-frame RAPID


def make_ramps(nints: int, ngroups: int, size: int, seed: int = 1):
    """Synthetic DN ramps (float32) with jumps and saturation, plus gdq, pdq, readnoise, gain."""
    rng = np.random.default_rng(seed)
    ny = nx = size
    gain = rng.uniform(1.8, 2.2, (ny, nx)).astype(np.float32)
    readnoise = rng.uniform(8.0, 12.0, (ny, nx)).astype(np.float32)   # DN, CDS
    flux = rng.uniform(100.0, 500.0, (ny, nx)).astype(np.float32)     # DN/group
    data = np.empty((nints, ngroups, ny, nx), np.float32)
    sigma_read = readnoise / np.float32(np.sqrt(2.0))
    for i in range(nints):
        acc = np.zeros((ny, nx), np.float32)
        for g in range(ngroups):
            # Poisson noise of the group's electrons, approximated as Gaussian
            acc += flux + rng.standard_normal((ny, nx), dtype=np.float32) * np.sqrt(flux / gain)
            data[i, g] = acc + rng.standard_normal((ny, nx), dtype=np.float32) * sigma_read
    gdq = np.zeros(data.shape, np.uint8)
    njump = int(1e-4 * data.size)
    ii, gg = rng.integers(0, nints, njump), rng.integers(1, ngroups, njump)
    yy, xx = rng.integers(0, ny, njump), rng.integers(0, nx, njump)
    amp = (10.0 ** rng.uniform(1.5, 3.5, njump)).astype(np.float32)
    for i, g, y, x, a in zip(ii, gg, yy, xx, amp):
        data[i, g:, y, x] += a
    nsat = int(1e-3 * ny * nx)
    for y, x, g in zip(rng.integers(0, ny, nsat), rng.integers(0, nx, nsat),
                       rng.integers(1, ngroups, nsat)):
        gdq[:, g:, y, x] |= 3  # SATURATED | DO_NOT_USE
    pdq = np.zeros((ny, nx), np.uint32)
    return data, gdq, pdq, readnoise, gain


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_one(which: str, nints: int, ngroups: int, size: int, out: str) -> None:
    """Child process: build the ramps, run one implementation, save flags and timings."""
    data, gdq, pdq, readnoise, gain = make_ramps(nints, ngroups, size)
    if which == "ours":
        from calstream.steps.jump import JumpParameters, detect_jumps

        params = JumpParameters()
        warm = make_ramps(1, ngroups, 16, seed=2)
        detect_jumps(*warm, 10.0, GROUP_TIME, NFRAMES, params)  # compile / load numba cache
        base = _rss_mb()
        base_peak = _peak_rss_mb()
        t0, c0 = time.perf_counter(), time.process_time()
        stats = detect_jumps(data, gdq, pdq, readnoise, gain, 10.0, GROUP_TIME, NFRAMES, params)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        ncrs = stats.primary_crs
        flags = gdq
    else:
        import logging

        from stcal.jump.jump import detect_jumps_data
        from stcal.jump.jump_class import JumpData
        from stdatamodels.jwst.datamodels import dqflags

        logging.disable(logging.INFO)
        jd = JumpData(gain2d=gain, rnoise2d=readnoise, dqflags=dqflags.pixel)
        jd.init_arrays_from_arrays(data, gdq, pdq)
        jd.nframes = NFRAMES
        jd.dt_group = np.ones(1)
        jd.n_reads_groupdiff = np.ones(1) * 2 * NFRAMES
        jd.max_cores = "1"
        base = _rss_mb()
        base_peak = _peak_rss_mb()
        t0, c0 = time.perf_counter(), time.process_time()
        flags, _, ncrs, _ = detect_jumps_data(jd)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _peak_rss_mb()
    np.save(out + ".npy", (flags & 4) != 0)
    with open(out + ".json", "w") as fh:
        json.dump({"time": elapsed, "cpu": cpu, "peak_extra_mb": max(peak, base_peak) - base,
                   "ncrs": int(ncrs)}, fh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nints", type=int, default=1)
    ap.add_argument("--ngroups", type=int, default=10)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--no-stcal", action="store_true")
    ap.add_argument("--child", choices=("ours", "stcal"))
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        run_one(args.child, args.nints, args.ngroups, args.size, args.out)
        return
    shape = f"{args.nints} x {args.ngroups} x {args.size} x {args.size}"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for which in ("ours",) + (() if args.no_stcal else ("stcal",)):
            out = os.path.join(tmp, which)
            subprocess.run([sys.executable, __file__, "--child", which, "--out", out,
                            "--nints", str(args.nints), "--ngroups", str(args.ngroups),
                            "--size", str(args.size)], check=True)
            with open(out + ".json") as fh:
                results[which] = json.load(fh)
            results[which]["flags"] = np.load(out + ".npy")
    ours = results["ours"]
    print(f"ramp {shape}")
    print(f"ours : {ours['time']:.3f} s wall, {ours['cpu']:.3f} s CPU  "
          f"peak extra RSS {ours['peak_extra_mb']:.0f} MB  "
          f"primary CRs {ours['ncrs']}")
    if "stcal" in results:
        ref = results["stcal"]
        agree = np.count_nonzero(ours["flags"] == ref["flags"]) / ref["flags"].size
        nref = np.count_nonzero(ref["flags"])
        ndiff = np.count_nonzero(ours["flags"] != ref["flags"])
        print(f"stcal: {ref['time']:.3f} s wall, {ref['cpu']:.3f} s CPU  "
              f"peak extra RSS {ref['peak_extra_mb']:.0f} MB  "
              f"primary CRs {ref['ncrs']}")
        print(f"speed-up {ref['time'] / ours['time']:.1f}x wall, "
              f"{ref['cpu'] / ours['cpu']:.1f}x CPU; JUMP_DET flags: {nref} in stcal, "
              f"{ndiff} samples differ ({agree:.6%} of samples agree)")


if __name__ == "__main__":
    main()
